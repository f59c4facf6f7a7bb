{{/*
Monitoring objects. Pods are always annotated for Prometheus' own pod discovery
(deploy/prometheus/prometheus-kubernetes.yml); these are for the Prometheus Operator and Grafana's
dashboard sidecar. Each is on when the chart's own switch or the global one is.
*/}}

{{- define "pdserve-lib.serviceMonitorEnabled" -}}
{{- $g := .Values.global | default dict -}}
{{- if or .Values.serviceMonitor.enabled (dig "monitoring" "serviceMonitor" false $g) }}true{{ end -}}
{{- end -}}

{{- define "pdserve-lib.dashboardsEnabled" -}}
{{- $g := .Values.global | default dict -}}
{{- if or .Values.dashboards.enabled (dig "monitoring" "dashboards" false $g) }}true{{ end -}}
{{- end -}}

{{/* A ServiceMonitor (monitoring.coreos.com/v1) scraping the "metrics" port of this chart's Service. */}}
{{- define "pdserve-lib.serviceMonitor" -}}
{{- if include "pdserve-lib.serviceMonitorEnabled" . }}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "pdserve-lib.fullname" . }}
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "pdserve-lib.labels" . | nindent 4 }}
    {{- with .Values.serviceMonitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "pdserve-lib.selectorLabels" . | nindent 6 }}
  namespaceSelector:
    matchNames:
      - {{ .Release.Namespace }}
  endpoints:
    - port: metrics
      path: /metrics
      interval: {{ .Values.serviceMonitor.interval }}
      {{- with include "pdserve-lib.tls" . }}
      {{- $tls := fromYaml . }}
      {{- if ne $tls.metrics "off" }}
      # HTTPS (global.tls.metrics); "mutual" wants a client certificate of the cluster's CA: the
      # component's own, which the operator reads from its Secret
      scheme: https
      tlsConfig:
        serverName: {{ $tls.serverName }}
        ca:
          secret: {name: {{ $tls.secretName }}, key: ca.crt}
        {{- if eq $tls.metrics "mutual" }}
        cert:
          secret: {name: {{ $tls.secretName }}, key: tls.crt}
        keySecret: {name: {{ $tls.secretName }}, key: tls.key}
        {{- end }}
      {{- end }}
      {{- end }}
      relabelings:
        # the same target labels as deploy/prometheus/prometheus-kubernetes.yml
        - sourceLabels: [__meta_kubernetes_pod_label_app_kubernetes_io_component]
          targetLabel: component
        - sourceLabels: [__meta_kubernetes_pod_node_name]
          targetLabel: node
{{- end }}
{{- end -}}

{{/* The chart's Grafana dashboards (files/dashboards/*.json, symlinks to deploy/grafana/dashboards)
in a ConfigMap labelled for the Grafana sidecar (grafana_dashboard: "1" by default). */}}
{{- define "pdserve-lib.dashboards" -}}
{{- if include "pdserve-lib.dashboardsEnabled" . }}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "pdserve-lib.fullname" . }}-dashboards
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "pdserve-lib.labels" . | nindent 4 }}
    {{- toYaml .Values.dashboards.labels | nindent 4 }}
  {{- with .Values.dashboards.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
data:
  {{- (.Files.Glob "files/dashboards/*.json").AsConfig | nindent 2 }}
{{- end }}
{{- end -}}
