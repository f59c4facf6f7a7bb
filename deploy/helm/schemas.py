"""Writes values.schema.json of every pdserve chart (deploy/helm/*/values.schema.json).

    python deploy/helm/schemas.py        # rewrites the schemas

Edit the definitions here, not the JSON: the charts share most keys, and a test
(tests/deploy/test_helm_charts.py) checks that the committed files are this script's output.
Unknown keys are rejected (additionalProperties: false) so that a misspelt value fails the
install instead of being ignored; `global` stays open, since every chart of a deployment shares it.
"""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
DRAFT = "http://json-schema.org/draft-07/schema#"


def obj(properties: dict, *, required: tuple = (), closed: bool = True, description: str = "") -> dict:
    schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    if description:
        schema["description"] = description
    return schema


def integer(
    minimum: int | None = None, maximum: int | None = None, *, nullable: bool = False, description: str = ""
) -> dict:
    schema: dict = {"type": ["integer", "null"] if nullable else "integer"}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    if description:
        schema["description"] = description
    return schema


def number(
    minimum: float | None = None,
    *,
    exclusive: bool = False,
    maximum: float | None = None,
    nullable: bool = False,
    description: str = "",
) -> dict:
    schema: dict = {"type": ["number", "null"] if nullable else "number"}
    if minimum is not None:
        schema["exclusiveMinimum" if exclusive else "minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    if description:
        schema["description"] = description
    return schema


def string(description: str = "", **extra) -> dict:
    return {"type": "string", **({"description": description} if description else {}), **extra}


BOOL = {"type": "boolean"}
PORT = integer(1, 65535)
ANY_OBJECT = {"type": "object"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
LIST = {"type": "array"}
LOG_LEVEL = {"type": "string", "enum": ["DEBUG", "INFO", "WARNING", "ERROR"]}
FLAGS = {
    "type": "array",
    "items": {"type": "string", "pattern": "^--[a-z0-9-]+(=.*)?$"},
    "description": "extra service flags, --name=value",
}
QUANTITY = {"type": ["string", "number"]}

IMAGE = obj(
    {
        "registry": string(),
        "repository": string(minLength=1),
        "tag": string(),
        "pullPolicy": {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]},
    },
    required=("repository",),
)
PROBE = obj(
    {
        "periodSeconds": integer(1),
        "timeoutSeconds": integer(1),
        "failureThreshold": integer(1),
        "initialDelaySeconds": integer(0),
        "successThreshold": integer(1),
    }
)
PROBES = obj({"startup": PROBE, "readiness": PROBE, "liveness": PROBE}, required=("startup", "readiness", "liveness"))
PDB = obj(
    {
        "enabled": BOOL,
        "maxUnavailable": {"type": ["integer", "string"]},
        "minAvailable": {"type": ["integer", "string"]},
    }
)
SERVICE_MONITOR = obj(
    {"enabled": BOOL, "interval": string(pattern="^([0-9]+(ms|s|m|h|d|w|y))+$"), "labels": STRING_MAP}
)
DASHBOARDS = obj({"enabled": BOOL, "labels": STRING_MAP, "annotations": STRING_MAP})
RESOURCES = obj(
    {
        "requests": {"type": "object", "additionalProperties": QUANTITY},
        "limits": {"type": "object", "additionalProperties": QUANTITY},
    }
)
GPU_RESOURCES = obj(
    {
        "requests": {"type": "object", "additionalProperties": QUANTITY},
        "limits": {
            "type": "object",
            "additionalProperties": QUANTITY,
            "properties": {
                "nvidia.com/gpu": integer(
                    0,
                    description="GPUs per pod (planner); unset: tensorParallel x pipelineParallel / podsPerReplica "
                    "(one per rank of the pod) on CUDA, none on cpu",
                )
            },
        },
    }
)

GLOBAL = obj(
    {
        "namePrefix": string(
            "object names are <namePrefix>-<component>; default: the release name",
            pattern="^([a-z]([-a-z0-9]*[a-z0-9])?)?$",
            maxLength=40,
        ),
        "clusterDomain": string(minLength=1),
        "imageRegistry": string(),
        "imageTag": string(),
        "modelPath": string("checkpoint folder inside the containers (--model); empty: the embedded tiny model"),
        "modelVolume": {"type": "object", "description": "a pod volume source holding the checkpoints"},
        "modelMountPath": string(pattern="^/"),
        "monitoring": obj({"serviceMonitor": BOOL, "dashboards": BOOL, "prometheusRule": BOOL}),
        "tls": obj(
            {
                "enabled": BOOL,
                "secretName": string("a Secret with tls.crt, tls.key and ca.crt shared by every component"),
                "serverName": string("the DNS name every certificate carries and peers check", minLength=1),
                "healthPort": PORT,
                "metrics": string(
                    "/metrics over HTTPS for scrapers with a cluster certificate, any scraper, or plaintext",
                    enum=["mutual", "server", "off"],
                ),
                "certManager": obj(
                    {
                        "enabled": BOOL,
                        "issuerRef": ANY_OBJECT,
                        "duration": string(),
                        "renewBefore": string(),
                    }
                ),
            },
            description="mutual TLS between services and on the router's API",
        ),
        "pdserveUmbrella": BOOL,
        # written by the planner (docs/planner.md)
        "model": {"type": ["string", "null"], "description": "model the plan is for (planner, informational)"},
        "gpu": {"type": ["string", "null"], "description": "GPU the plan is for (planner, informational)"},
        "plannedRate": number(0, nullable=True, description="req/s the plan covers (planner)"),
        "slo": obj(
            {
                "ttftSeconds": number(0, exclusive=True, nullable=True),
                "tpotSeconds": number(0, exclusive=True, nullable=True),
                "attainment": number(0, exclusive=True, maximum=1, nullable=True),
            },
            description="SLOs (planner): the router's --slo-* flags",
        ),
    },
    closed=False,
)


ADMISSION = obj(
    {
        "maxInflightRequests": integer(0, nullable=True, description="--max-inflight-requests (0: no bound)"),
        "maxQueuedPromptTokens": integer(0, nullable=True, description="--max-queued-prompt-tokens (0: no bound)"),
    },
    description="admission bounds: past them, RESOURCE_EXHAUSTED with retry-after; null: the service's default",
)


def pod_keys() -> dict:
    return {
        "enabled": {"type": "boolean", "description": "umbrella chart: install this component"},
        "image": IMAGE,
        "imagePullSecrets": LIST,
        "port": PORT,
        "metricsPort": PORT,
        "graceSeconds": number(0),
        "logLevel": LOG_LEVEL,
        "healthService": string(pattern="^pdserve\\.v1\\.[A-Za-z]+$"),
        "extraArgs": FLAGS,
        "extraEnv": LIST,
        "probes": PROBES,
        "cacheSizeLimit": QUANTITY,
        "podAnnotations": STRING_MAP,
        "podSecurityContext": ANY_OBJECT,
        "securityContext": ANY_OBJECT,
        "priorityClassName": string(),
        "nodeSelector": STRING_MAP,
        "tolerations": LIST,
        "affinity": ANY_OBJECT,
        "serviceMonitor": SERVICE_MONITOR,
        "dashboards": DASHBOARDS,
        "global": GLOBAL,
        # Helm adds a key per dependency: this one is the library chart's (it has no values).
        "pdserve-lib": ANY_OBJECT,
    }


def worker_schema(role: str) -> dict:
    keys = pod_keys()
    keys.update(
        {
            "replicaCount": integer(0, description="worker pods (planner)"),
            "tensorParallel": integer(
                1,
                description="--tensor-parallel (planner): tensor-parallel ranks per pipeline stage, "
                "one process and one GPU each; a stage's ranks are always in one pod",
            ),
            "pipelineParallel": integer(
                1,
                description="--pipeline-parallel (planner): pipeline stages per instance, each of "
                "tensorParallel ranks, pipelineParallel / podsPerReplica whole stages per pod (each pod "
                "asks for tensorParallel x pipelineParallel / podsPerReplica GPUs)",
            ),
            "podsPerReplica": integer(
                1,
                description="pods per instance (planner), each on a node of its own or not; must divide "
                "pipelineParallel (refused at render otherwise). 1: a Deployment, the worker starts every "
                "rank; above 1: StatefulSets, pod 0 the worker with --pods, pods 1..P-1 "
                "services.engine.follower",
            ),
            "rendezvousPort": integer(
                1,
                65534,
                description="--rendezvous-port, with podsPerReplica > 1: the worker waits for its "
                "followers there; the ranks' process-group store listens on the next port",
            ),
            "expectedGoodputPerReplica": number(0, nullable=True),
            "kvstorePort": PORT,
            "device": string(pattern="^(cpu|cuda(:[0-9]+)?)$"),
            "dtype": {"type": "string", "enum": ["bfloat16", "float16", "float32"]},
            "maxNumSeqs": integer(1),
            "maxBatchedTokens": integer(1, nullable=True, description="--max-num-batched-tokens (planner: L_m)"),
            "gpuMemoryUtilization": number(0, exclusive=True, maximum=1, nullable=True),
            "kvCacheGb": number(0, exclusive=True, nullable=True),
            "maxModelLen": integer(1, nullable=True),
            **(
                {
                    "streamInterval": integer(
                        1, nullable=True, description="--stream-interval: tokens per streamed message"
                    )
                }
                if role == "decode"
                else {}
            ),
            "admission": ADMISSION,
            "resources": GPU_RESOURCES,
            "updateStrategy": ANY_OBJECT,
            "podDisruptionBudget": PDB,
        }
    )
    return {
        "$schema": DRAFT,
        "title": f"pdserve {role} chart values",
        **obj(
            keys,
            required=(
                "replicaCount",
                "image",
                "port",
                "metricsPort",
                "graceSeconds",
                "kvstorePort",
                "healthService",
                "device",
                "dtype",
                "resources",
                "probes",
            ),
        ),
    }


def router_schema() -> dict:
    keys = pod_keys()
    role_discovery = obj(
        {
            "address": string(
                "host:port of a DNS name resolving to the workers; default: "
                "<prefix>-<role>-headless.<namespace>.svc.<clusterDomain>:<port>",
                pattern="^([^:]+:[0-9]+)?$",
            ),
            "port": PORT,
        }
    )
    keys.update(
        {
            "replicaCount": integer(0),
            "httpPort": integer(
                0,
                65535,
                nullable=True,
                description="--http-port: the OpenAI-compatible HTTP API (HTTPS with global.tls); 0 or null: off",
            ),
            "servedModelName": string(
                "--served-model-name: the model's name in both APIs; empty: the service's default (--model)"
            ),
            "discovery": obj({"prefill": role_discovery, "decode": role_discovery}, required=("prefill", "decode")),
            "slo": obj(
                {
                    "ttftSeconds": number(0, exclusive=True),
                    "tpotSeconds": number(0, exclusive=True),
                    "attainmentTarget": number(0, exclusive=True, maximum=1),
                    "windowSeconds": number(0, exclusive=True),
                },
                description="default SLOs; global.slo (the planner's) wins where set",
            ),
            "prefillPolicy": {
                "type": "string",
                "enum": ["kv-aware", "least-loaded"],
                "description": "--prefill-policy: where prompts go",
            },
            "service": obj(
                {
                    "type": {"type": "string", "enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                    "port": PORT,
                    "httpPort": integer(1, 65535, description="the Service's port for the HTTP API (to httpPort)"),
                    "annotations": STRING_MAP,
                }
            ),
            "ingress": obj(
                {
                    "enabled": BOOL,
                    "className": string(),
                    "host": string(),
                    "path": string(pattern="^/"),
                    "annotations": STRING_MAP,
                    "tls": obj({"secretName": string("an existing kubernetes.io/tls Secret; empty: no TLS")}),
                }
            ),
            "admission": ADMISSION,
            "apiKeys": obj(
                {"secretName": string("a Secret with API keys, one per line; empty: open API"), "key": string()}
            ),
            "resources": RESOURCES,
            "podDisruptionBudget": PDB,
        }
    )
    return {
        "$schema": DRAFT,
        "title": "pdserve router chart values",
        **obj(keys, required=("replicaCount", "image", "port", "metricsPort", "discovery", "slo", "probes")),
    }


def kvstore_schema() -> dict:
    keys = pod_keys()
    keys.update(
        {
            "hostNetwork": {
                "type": "boolean",
                "description": "true: the daemon uses the node's network (UCX over the "
                "node's NICs, RDMA); false: pod network, gRPC via a hostPort",
            },
            "transferPort": integer(
                1, 65520, description="the first of the 16 ports UCX's TCP transport may listen on"
            ),
            "ucxTls": string("--ucx-tls, e.g. rc,cuda_copy,cuda_ipc,tcp,sm,self; empty: the daemon's default"),
            "ttlSeconds": number(0, exclusive=True),
            "hostTierBytes": integer(0),
            "hostTtlSeconds": number(0, exclusive=True),
            "prefixStoreBytes": integer(0),
            "visibleDevices": string(
                "NVIDIA_VISIBLE_DEVICES for the daemon (it maps every worker's GPU pool "
                "without taking GPUs from the device plugin); empty: unset"
            ),
            "runtimeClassName": string(),
            "resources": RESOURCES,
            "updateStrategy": ANY_OBJECT,
        }
    )
    return {
        "$schema": DRAFT,
        "title": "pdserve kvstore chart values",
        **obj(keys, required=("image", "port", "metricsPort", "hostNetwork", "transferPort", "probes")),
    }


def umbrella_schema() -> dict:
    stage = obj(
        {"stage": integer(0), "node": integer(0), "gpus": {"type": "array", "items": integer(0)}}, required=("node",)
    )
    instance = obj(
        {
            "role": {"type": "string", "enum": ["prefill", "decode"]},
            "index": integer(0),
            "unit": integer(0),
            "stages": {"type": "array", "items": stage, "minItems": 1},
        },
        required=("role", "stages"),
    )
    members = {"type": "array", "items": obj({"instance": integer(0), "gpus": LIST})}
    segment = obj({"name": string(), "node": integer(0), "prefill": members, "decode": members})
    component = {
        "type": "object",
        "properties": {"enabled": BOOL},
        "description": "values of the subchart of the same name (its own values.schema.json checks them)",
    }
    return {
        "$schema": DRAFT,
        "title": "pdserve umbrella chart values",
        **obj(
            {
                "global": GLOBAL,
                "pdserve-lib": ANY_OBJECT,
                "router": component,
                "prefill": component,
                "decode": component,
                "kvstore": component,
                "prometheusRule": obj({"enabled": BOOL, "labels": STRING_MAP}),
                "placement": obj(
                    {
                        "enabled": {"type": "boolean", "description": "pin worker pods to the planned nodes"},
                        "algorithm": {"type": ["string", "null"], "enum": ["high-affinity", "low-affinity", "", None]},
                        "nodeLabel": string(minLength=1),
                        "instances": {"type": "array", "items": instance},
                        "segments": {"type": "array", "items": segment},
                    },
                    description="the planner's placement (docs/planner.md)",
                ),
            }
        ),
    }


def build() -> dict[str, dict]:
    return {
        "router": router_schema(),
        "prefill": worker_schema("prefill"),
        "decode": worker_schema("decode"),
        "kvstore": kvstore_schema(),
        "pdserve": umbrella_schema(),
    }


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2) + "\n"


if __name__ == "__main__":
    for chart, schema in build().items():
        path = os.path.join(HERE, chart, "values.schema.json")
        with open(path, "w") as f:
            f.write(render(schema))
        print("wrote", path)
