{{/* Router-only helpers; the shared ones are in charts/pdserve-lib. */}}

{{/* --<role>-dns for a worker role: discovery.<role>.address, else the headless Service that the
<role> chart creates with the same name prefix. (dict "root" . "role" "prefill") */}}
{{- define "router.workerAddress" -}}
{{- $d := index .root.Values.discovery .role -}}
{{- $d.address | default (include "pdserve-lib.headlessAddress" (dict "root" .root "component" .role "port" $d.port)) -}}
{{- end -}}

{{/* An SLO: global.slo.<key> (the planner's) when set, else slo.<key>. (dict "root" . "global" "ttftSeconds" "local" "ttftSeconds") */}}
{{- define "router.slo" -}}
{{- $g := .root.Values.global | default dict -}}
{{- $gs := $g.slo | default dict -}}
{{- $v := index $gs .global -}}
{{- if kindIs "invalid" $v }}{{ $v = index .root.Values.slo .local }}{{ end -}}
{{- $v -}}
{{- end -}}

{{/* --http-port: httpPort, or -1 (the HTTP API off) when it is 0 or null. */}}
{{- define "router.httpPort" -}}
{{- if .Values.httpPort }}{{ .Values.httpPort | int }}{{ else }}-1{{ end -}}
{{- end -}}
