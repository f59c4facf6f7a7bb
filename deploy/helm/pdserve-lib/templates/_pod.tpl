{{/*
Pieces of every pdserve pod. They take a chart's context (`.`) unless said otherwise.
*/}}

{{/* Prometheus pod discovery (deploy/prometheus/prometheus-kubernetes.yml) reads these. */}}
{{- define "pdserve-lib.podAnnotations" -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.metricsPort | quote }}
prometheus.io/path: /metrics
{{- with include "pdserve-lib.tls" . }}
{{- if ne (fromYaml .).metrics "off" }}
prometheus.io/scheme: https
{{- end }}
{{- end }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Flags every server has (services/common/flags.py common_server_flags). The ports the pod
listens on must differ (the kvstore's transferPort, the first of the 16 its UCX may take, and the
router's httpPort too), or a bind fails at start-up and the pod crash-loops. */}}
{{- define "pdserve-lib.serverArgs" -}}
{{- $ports := dict -}}
{{- range $key := list "port" "metricsPort" "transferPort" "httpPort" -}}
{{- with index $.Values $key -}}
{{- $first := int . -}}
{{- range $i := until (ternary 16 1 (eq $key "transferPort")) -}}
{{- $port := add $first $i -}}
{{- $taken := get $ports (toString $port) -}}
{{- if $taken -}}
{{- fail (printf "%s.%s and %s.%s are both %d: the pod listens on each, so they must differ" $.Chart.Name $taken $.Chart.Name $key $port) -}}
{{- end -}}
{{- $_ := set $ports (toString $port) $key -}}
{{- end -}}
{{- end -}}
{{- end -}}
- --host=0.0.0.0
- --port={{ .Values.port }}
- --metrics-port={{ .Values.metricsPort }}
- --grace-seconds={{ .Values.graceSeconds }}
- --log-level={{ .Values.logLevel }}
{{- with include "pdserve-lib.tls" . }}
{{- $tls := fromYaml . }}
# mutual TLS with the cluster's CA (services/common/tls.py); probes use the plaintext health port
- --tls-cert=/etc/pdserve/tls/tls.crt
- --tls-key=/etc/pdserve/tls/tls.key
- --tls-ca=/etc/pdserve/tls/ca.crt
- --tls-server-name={{ $tls.serverName }}
- --health-port={{ $tls.healthPort }}
- --metrics-tls={{ $tls.metrics }}
{{- end }}
{{- end -}}

{{/* global.tls when enabled (as YAML), else nothing. */}}
{{- define "pdserve-lib.tls" -}}
{{- $tls := (.Values.global | default dict).tls | default dict -}}
{{- if $tls.enabled -}}
{{- if and (not $tls.secretName) (not ($tls.certManager | default dict).enabled) -}}
{{- fail "global.tls.enabled needs global.tls.secretName (a Secret with tls.crt, tls.key, ca.crt) or global.tls.certManager.enabled" -}}
{{- end -}}
serverName: {{ $tls.serverName | default "pdserve" }}
healthPort: {{ $tls.healthPort | default 7900 }}
metrics: {{ $tls.metrics | default "mutual" | quote }}
secretName: {{ if ($tls.certManager | default dict).enabled }}{{ include "pdserve-lib.fullname" . }}-tls{{ else }}{{ $tls.secretName }}{{ end }}
{{- end -}}
{{- end -}}

{{/* A cert-manager Certificate for this component (global.tls.certManager): server and client
use, the fixed name every peer checks, signed by the given issuer (the cluster's CA). */}}
{{- define "pdserve-lib.certificate" -}}
{{- $tls := (.Values.global | default dict).tls | default dict -}}
{{- if and $tls.enabled ($tls.certManager | default dict).enabled }}
apiVersion: cert-manager.io/v1
kind: Certificate
metadata:
  name: {{ include "pdserve-lib.fullname" . }}-tls
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "pdserve-lib.labels" . | nindent 4 }}
spec:
  secretName: {{ include "pdserve-lib.fullname" . }}-tls
  commonName: {{ include "pdserve-lib.fullname" . }}
  dnsNames:
    - {{ $tls.serverName | default "pdserve" }}
  usages: [server auth, client auth, digital signature, key encipherment]
  duration: {{ $tls.certManager.duration | default "720h" }}
  renewBefore: {{ $tls.certManager.renewBefore | default "240h" }}
  privateKey:
    algorithm: ECDSA
    size: 256
  issuerRef:
    {{- required "global.tls.certManager.issuerRef: the issuer of the cluster's CA" $tls.certManager.issuerRef | toYaml | nindent 4 }}
{{- end }}
{{- end -}}

{{/* --model: a checkpoint folder inside the model volume; none: the embedded tiny test model. */}}
{{- define "pdserve-lib.modelArgs" -}}
{{- $g := .Values.global | default dict -}}
{{- with $g.modelPath }}
- --model={{ . }}
{{- end }}
{{- end -}}

{{/* Drain on SIGTERM takes up to --grace-seconds, then the server stops (up to 5 s more) and the
engine closes: the kubelet waits a little longer than that before SIGKILL. */}}
{{- define "pdserve-lib.terminationGracePeriod" -}}
{{- add (int .Values.graceSeconds) 20 -}}
{{- end -}}

{{/* Native gRPC probes (Kubernetes >= 1.27) against grpc.health.v1 on the gRPC port.
Readiness asks for the server's overall status (""), which is NOT_SERVING while the service
cannot work yet (the router without workers of each role) and while draining. Startup and
liveness ask for the service's own name, SERVING from start-up until the drain: a router waiting
for workers is alive, not ready. (dict "root" . "service" "pdserve.v1.Router") */}}
{{- define "pdserve-lib.probes" -}}
{{- $v := .root.Values -}}
{{- $port := $v.port -}}
{{- with include "pdserve-lib.tls" .root }}{{ $port = (fromYaml .).healthPort }}{{ end }}
startupProbe:
  grpc:
    port: {{ $port }}
    service: {{ .service }}
  {{- toYaml $v.probes.startup | nindent 2 }}
readinessProbe:
  grpc:
    port: {{ $port }}
  {{- toYaml $v.probes.readiness | nindent 2 }}
livenessProbe:
  grpc:
    port: {{ $port }}
    service: {{ .service }}
  {{- toYaml $v.probes.liveness | nindent 2 }}
{{- end -}}

{{/* Downward-API variables, used in args as $(K8S_NODE_NAME) etc. (Kubernetes expands them).
PDSERVE_CACHE is not a flag: the folder for the generated tiny model and compile caches. */}}
{{- define "pdserve-lib.env" -}}
- name: K8S_NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: K8S_HOST_IP
  valueFrom:
    fieldRef:
      fieldPath: status.hostIP
- name: K8S_POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: PDSERVE_CACHE
  value: /cache/pdserve
- name: TRITON_CACHE_DIR
  value: /cache/triton
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "pdserve-lib.volumeMounts" -}}
{{- $g := .Values.global | default dict -}}
- name: cache
  mountPath: /cache
{{- if $g.modelVolume }}
- name: model
  mountPath: {{ $g.modelMountPath | default "/models" }}
  readOnly: true
{{- end }}
{{- if include "pdserve-lib.tls" . }}
- name: tls
  mountPath: /etc/pdserve/tls
  readOnly: true
{{- end }}
{{- if (.Values.apiKeys | default dict).secretName }}
- name: api-keys
  mountPath: /etc/pdserve/api-keys
  readOnly: true
{{- end }}
{{- end -}}

{{- define "pdserve-lib.volumes" -}}
{{- $g := .Values.global | default dict -}}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.cacheSizeLimit | default "4Gi" }}
{{- with $g.modelVolume }}
- name: model
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with include "pdserve-lib.tls" . }}
- name: tls
  secret:
    secretName: {{ (fromYaml .).secretName }}
    defaultMode: 0400
{{- end }}
{{- with (.Values.apiKeys | default dict).secretName }}
- name: api-keys
  secret:
    secretName: {{ . }}
    defaultMode: 0400
{{- end }}
{{- end -}}

{{/* Scheduling and security fields shared by all pods (each value may be empty). */}}
{{- define "pdserve-lib.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Admission bounds (services/common/admission.py): past them, RESOURCE_EXHAUSTED at once.
Unset keys keep the service's default. */}}
{{- define "pdserve-lib.admissionArgs" -}}
{{- with . }}
{{- if ne .maxInflightRequests nil }}
- --max-inflight-requests={{ .maxInflightRequests | int64 }}
{{- end }}
{{- if ne .maxQueuedPromptTokens nil }}
- --max-queued-prompt-tokens={{ .maxQueuedPromptTokens | int64 }}
{{- end }}
{{- end }}
{{- end }}
