{{/* kvstore-only helpers; the shared ones are in charts/pdserve-lib. */}}

{{/* The address other nodes reach this daemon at, for UCX (--transfer-host) and gRPC
(--advertise-address): with hostNetwork the node's IP, else the pod's IP (pod IPs are routable
between nodes in a conformant cluster network). */}}
{{- define "kvstore.reachableIP" -}}
{{- if .Values.hostNetwork }}$(K8S_HOST_IP){{ else }}$(K8S_POD_IP){{ end -}}
{{- end -}}
