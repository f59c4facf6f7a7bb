{{/* Umbrella-only helpers; names and labels come from charts/pdserve-lib. */}}

{{/* Labels of the umbrella's own objects (the plan ConfigMap, the PrometheusRule). */}}
{{- define "pdserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: pdserve
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: pdserve
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The subcharts are configured separately; these settings must agree across them. */}}
{{- define "pdserve.checks" -}}
{{- $v := .Values -}}
{{- range $role := list "prefill" "decode" -}}
  {{- if and $v.router.enabled (index $v $role).enabled -}}
    {{- $workerPort := (index $.Subcharts $role).Values.port -}}
    {{- $routerPort := (index $.Subcharts.router.Values.discovery $role).port -}}
    {{- if ne (int $workerPort) (int $routerPort) -}}
      {{- fail (printf "%s.port (%d) differs from router.discovery.%s.port (%d): the router would dial the wrong port" $role (int $workerPort) $role (int $routerPort)) -}}
    {{- end -}}
  {{- end -}}
  {{- if and $v.kvstore.enabled (index $v $role).enabled -}}
    {{- $kvPort := (index $.Subcharts $role).Values.kvstorePort -}}
    {{- if ne (int $kvPort) (int $.Subcharts.kvstore.Values.port) -}}
      {{- fail (printf "%s.kvstorePort (%d) differs from kvstore.port (%d)" $role (int $kvPort) (int $.Subcharts.kvstore.Values.port)) -}}
    {{- end -}}
  {{- end -}}
{{- end -}}
{{- end -}}
