"""The HTTP API's pure parts: stop-string matching over streamed text, and request bodies checked
into what the router serves (the e2e tests, test_openai_api.py, send the bad ones over HTTP)."""

from __future__ import annotations

import random

import pytest

from services.router.openai_params import ApiError, parse
from services.router.stop_strings import StopStrings


def _stream(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopStrings(stops)
    out = "".join(matcher.feed(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces))
    return out, matcher.stopped


@pytest.mark.parametrize("seed", range(20))
def test_stop_strings_match_whatever_the_pieces(seed):
    """Cut into random pieces, the text streams out exactly as cut at the first stop string."""
    rng = random.Random(seed)
    text = "".join(rng.choice("ab c\n") for _ in range(60))
    stops = tuple({"".join(rng.choice("ab c") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4))})
    cuts = sorted(rng.sample(range(1, len(text)), 10))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    out, stopped = _stream(stops, pieces)
    assert out == (text[: min(found)] if found else text)
    assert stopped == bool(found)


def test_stop_strings_hold_back_only_a_possible_start():
    matcher = StopStrings(("END",))
    assert matcher.feed("hello E") == "hello "  # "E" may begin END
    assert matcher.feed("xtra N") == "Extra N"  # it did not; "N" cannot begin END
    assert matcher.feed("EN") == ""
    assert matcher.feed("D and more") == "" and matcher.stopped
    assert matcher.feed("later") == ""
    before_min = StopStrings(("ab",), min_tokens=2)
    assert before_min.feed("xab", num_tokens=1) == "xab" and not before_min.stopped  # min_tokens not reached
    assert before_min.feed("yab", num_tokens=2) == "y" and before_min.stopped


def test_a_completion_body_becomes_sampling_and_extras():
    req = parse(
        {
            "model": "m",
            "prompt": [[1, 2], [3]],
            "max_tokens": 7,
            "temperature": 0,
            "top_p": 0.5,
            "seed": -1,
            "stop": "x",
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": 0,
            "top_k": -1,
            "ignore_eos": True,
            "stop_token_ids": [4],
            "min_tokens": 2,
            "slo_ttft_seconds": 0.5,
            "frequency_penalty": 0,
            "user": "u",
        },
        chat=False,
    )
    sp = req.sampling
    assert req.prompts == [[1, 2], [3]] and req.n == 2 and req.stream and req.include_usage and req.logprobs
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.ignore_eos) == (7, 0, 0.5, 0, True)
    assert sp.seed == (1 << 64) - 1 and list(sp.stop) == ["x"] and list(sp.stop_token_ids) == [4]
    assert sp.min_tokens == 2 and req.slo_ttft_seconds == 0.5 and req.slo_tpot_seconds is None
    assert not parse({"prompt": "hi"}, chat=False).sampling.HasField("temperature")  # unset: the default


def test_a_chat_body_takes_text_parts_and_max_completion_tokens():
    req = parse(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None},
            ],
            "max_tokens": 5,
            "max_completion_tokens": 9,
            "logprobs": True,
            "tool_choice": "none",
            "response_format": {"type": "text"},
        },
        chat=True,
    )
    assert req.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
    ]
    assert req.sampling.max_tokens == 9 and req.logprobs


@pytest.mark.parametrize(
    "body, chat, param",
    [
        ({"prompt": "hi", "temperature": float("nan")}, False, "temperature"),
        ({"prompt": "hi", "n": 100, "best_of": 100}, False, None),
        ({"prompt": ["a"] * 20, "n": 10}, False, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "echo": True}, True, "echo"),
        ({"prompt": "hi", "max_tokens": 2**40}, False, "max_tokens"),
    ],
)
def test_bad_values_name_their_parameter(body, chat, param):
    if param is None:
        parse(body, chat=chat)
        return
    with pytest.raises(ApiError) as err:
        parse(body, chat=chat)
    assert err.value.status == 400 and err.value.param == param
    assert set(err.value.body()["error"]) == {"message", "type", "param", "code"}


def test_a_chunk_of_several_tokens_stops_at_the_token_that_completes_the_stop_string():
    """A slow client's tokens come merged: the output ends at the token completing the stop string,
    and no stop string is matched in the first min_tokens tokens' text."""
    from transformers import AutoTokenizer

    from services.router.detokenizer import IncrementalDetokenizer
    from services.router.server import _until_stop
    from services.tiny_models import get_model

    tokenizer = AutoTokenizer.from_pretrained(get_model("llama"))
    ids = tokenizer.encode(" hello world, once upon a time there lived a fox")
    pieces = [tokenizer.decode([t]) for t in ids]
    whole = "".join(pieces)
    k = next(i for i in range(2, len(ids)) if len(pieces[i]) > 1)
    stop = pieces[k - 1][-1:] + pieces[k][:2]  # spans tokens k-1 and k
    at = whole.index(stop)
    complete = next(i for i in range(len(ids)) if len("".join(pieces[: i + 1])) >= at + len(stop))
    text, kept = _until_stop(IncrementalDetokenizer(tokenizer, []), StopStrings((stop,)), ids, True, 0)
    assert (text, kept) == (whole[:at], complete + 1)
    # with min_tokens past the token completing it, that occurrence is output like any text
    later = StopStrings((stop,), min_tokens=complete + 2)
    text, kept = _until_stop(IncrementalDetokenizer(tokenizer, []), later, ids, True, 0)
    assert text.startswith(whole[: at + len(stop)]) and (kept == len(ids)) != later.stopped
