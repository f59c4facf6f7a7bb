{{/*
Names and labels. Every template here takes a chart's context (`.`); the component (router,
prefill, decode, kvstore) is the chart's name.

Objects are named <prefix>-<component>, where the prefix is global.namePrefix or else the release
name. The names are fixed (no nameOverride) because the router finds the workers by them: the
router chart computes "<prefix>-prefill-headless" on its own, so all charts of one deployment must
share the prefix (the umbrella chart: one release; separate releases: set global.namePrefix).
*/}}

{{- define "pdserve-lib.prefix" -}}
{{- $g := .Values.global | default dict -}}
{{- /* 40 leaves room for "-prefill-headless" within the 63 characters of a DNS label. */ -}}
{{- $g.namePrefix | default .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "pdserve-lib.fullname" -}}
{{- printf "%s-%s" (include "pdserve-lib.prefix" .) .Chart.Name -}}
{{- end -}}

{{/* Another component's name: (dict "root" . "component" "prefill"). */}}
{{- define "pdserve-lib.componentName" -}}
{{- printf "%s-%s" (include "pdserve-lib.prefix" .root) .component -}}
{{- end -}}

{{/* A worker role's headless Service: (dict "root" . "component" "prefill"). */}}
{{- define "pdserve-lib.headlessName" -}}
{{- printf "%s-headless" (include "pdserve-lib.componentName" .) -}}
{{- end -}}

{{/* host:port of a worker role's headless Service, resolving to its ready pods' IPs: the router's
--prefill-dns / --decode-dns. (dict "root" . "component" "prefill" "port" 7200) */}}
{{- define "pdserve-lib.headlessAddress" -}}
{{- $g := .root.Values.global | default dict -}}
{{- printf "%s.%s.svc.%s:%d" (include "pdserve-lib.headlessName" .) .root.Release.Namespace ($g.clusterDomain | default "cluster.local") (int .port) -}}
{{- end -}}

{{- define "pdserve-lib.selectorLabels" -}}
app.kubernetes.io/name: pdserve-{{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* part-of and component are what deploy/prometheus/prometheus-kubernetes.yml keeps and labels by. */}}
{{- define "pdserve-lib.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "pdserve-lib.selectorLabels" . }}
app.kubernetes.io/component: {{ .Chart.Name }}
app.kubernetes.io/part-of: pdserve
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* registry/repository:tag; global.imageRegistry and global.imageTag apply to every chart. */}}
{{- define "pdserve-lib.image" -}}
{{- $g := .Values.global | default dict -}}
{{- $registry := $g.imageRegistry | default .Values.image.registry -}}
{{- $tag := .Values.image.tag | default $g.imageTag | default .Chart.AppVersion -}}
{{- if $registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" $registry) .Values.image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}
