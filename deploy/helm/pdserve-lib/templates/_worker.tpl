{{/*
The engine workers (prefill, decode): Deployments, the headless Service the router resolves, and
the PodDisruptionBudget.

Why Deployments, not StatefulSets: a worker has no identity the system depends on. The router
finds workers through the headless Service's DNS records (pod IPs of ready pods) and tells them
apart by the address it dialled; the KV cache lives only as long as the process; the weights are
read-only from a shared volume; a replacement pod on another node is as good as the old one. A
StatefulSet would add ordered, one-at-a-time start-up (minutes per GPU worker loading weights)
and per-pod volumes nobody needs. (An instance with tensor/pipeline parallelism is still one pod:
its ranks are child processes of the worker. Multi-pod instances, a pipeline across nodes, would
need stable identities and a rendezvous; the engine does not implement them.)
*/}}

{{/*
Parallelism of one instance. The worker process is rank 0 and starts ranks 1..tp*pp-1 itself, as
its child processes in the same container, rank r on cuda:(first + r) (first: --device's index,
0 for plain "cuda"); so the pod holds every rank and must see tp*pp GPUs. A pipeline with a stage
per pod (podsPerReplica > 1) would need ranks in different pods to find each other, which the
engine does not do: refused. (values.schema.json keeps all three at 1 or more.)
*/}}
{{- define "pdserve-lib.checkParallelism" -}}
{{- $v := .Values -}}
{{- $pods := $v.podsPerReplica | default 1 | int -}}
{{- if gt $pods 1 -}}
{{- $ranks := include "pdserve-lib.ranks" . | int -}}
{{- fail (printf "%s.podsPerReplica is %d, but pdserve runs all %d ranks of an instance (tensorParallel %d x pipelineParallel %d) in one pod, as child processes of rank 0: a pipeline with a stage per pod would need the ranks of different pods to rendezvous, which the engine does not do yet. Re-plan so that each instance fits one node (pdserve plan search --max-nodes-per-instance 1; docs/deploy.md, 'Tensor and pipeline parallelism'), or set %s.podsPerReplica=1 if one node has the instance's %d GPUs." $.Chart.Name $pods $ranks ($v.tensorParallel | default 1 | int) ($v.pipelineParallel | default 1 | int) $.Chart.Name $ranks) -}}
{{- end -}}
{{- end -}}

{{/* Processes (ranks) of one instance: tensorParallel x pipelineParallel. */}}
{{- define "pdserve-lib.ranks" -}}
{{- mul (.Values.tensorParallel | default 1 | int) (.Values.pipelineParallel | default 1 | int) -}}
{{- end -}}

{{/*
The worker container's resources: `resources` as given, plus on CUDA the GPU limit. Unset, it is
tensorParallel x pipelineParallel (one GPU per rank); set (the planner writes it), it must cover
ranks on cuda:first .. cuda:first+tp*pp-1 (the pod sees its GPUs as cuda:0..). On the CPU device
no GPU is added: the ranks share the pod's CPUs.
*/}}
{{- define "pdserve-lib.workerResources" -}}
{{- $v := .Values -}}
{{- $resources := deepCopy ($v.resources | default dict) -}}
{{- if hasPrefix "cuda" $v.device -}}
  {{- $ranks := include "pdserve-lib.ranks" . | int -}}
  {{- $first := 0 -}}
  {{- if contains ":" $v.device -}}{{- $first = regexReplaceAll "^cuda:" $v.device "" | int -}}{{- end -}}
  {{- $limits := $resources.limits | default dict -}}
  {{- $gpus := index $limits "nvidia.com/gpu" -}}
  {{- if kindIs "invalid" $gpus -}}
    {{- $gpus = add $first $ranks -}}
  {{- else if lt (int $gpus) (add $first $ranks | int) -}}
    {{- fail (printf "%s.resources.limits.nvidia.com/gpu is %d, but the instance's %d ranks (tensorParallel x pipelineParallel) run on cuda:%d..cuda:%d, one GPU each, all in this pod: ask for %d GPUs, or leave the key unset (the chart then asks for one per rank)." $.Chart.Name (int $gpus) $ranks $first (sub (add $first $ranks) 1 | int) (add $first $ranks | int)) -}}
  {{- end -}}
  {{- $_ := set $limits "nvidia.com/gpu" (int $gpus) -}}
  {{- $_ := set $resources "limits" $limits -}}
{{- end -}}
{{- with $resources }}{{ toYaml . }}{{ end -}}
{{- end -}}

{{/*
Every Deployment of a worker role: (dict "root" <the worker chart's context> "placement" <placement or nil>).

Without a placement: one Deployment of replicaCount pods, placed by the scheduler.
With the planner's placement (the umbrella chart's top-level `placement`, enabled and listing
instances of this role): one Deployment per planned node, "<name>-node<N>", with as many replicas as
instances the plan puts there and a nodeSelector on placement.nodeLabel=<N>. Their pods carry the
same component labels, so the headless Service and the PodDisruptionBudget cover all of them.
*/}}
{{- define "pdserve-lib.workerDeployments" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- include "pdserve-lib.checkParallelism" $root -}}
{{- $placement := .placement | default dict -}}
{{- $groups := list -}}
{{- if and $placement.enabled $placement.instances -}}
  {{- $perNode := dict -}}
  {{- $count := 0 -}}
  {{- range $placement.instances -}}
    {{- if eq .role $root.Chart.Name -}}
      {{- $node := toString (index .stages 0).node -}}
      {{- $_ := set $perNode $node (add1 (get $perNode $node | default 0)) -}}
      {{- $count = add1 $count -}}
    {{- end -}}
  {{- end -}}
  {{- if and $count (ne (int $count) (int $v.replicaCount)) -}}
    {{- fail (printf "%s.replicaCount is %d but placement.instances places %d %s instances: re-run the planner, or set placement.enabled=false to scale freely." $root.Chart.Name (int $v.replicaCount) (int $count) $root.Chart.Name) -}}
  {{- end -}}
  {{- range $node := keys $perNode | sortAlpha -}}
    {{- $selector := merge (dict $placement.nodeLabel $node) ($v.nodeSelector | default dict) -}}
    {{- $groups = append $groups (dict "name" (printf "node%s" $node) "replicas" (get $perNode $node) "nodeSelector" $selector) -}}
  {{- end -}}
{{- end -}}
{{- if not $groups -}}
  {{- $groups = list (dict "name" "" "replicas" $v.replicaCount "nodeSelector" ($v.nodeSelector | default dict)) -}}
{{- end -}}
{{- range $groups }}
---
{{ include "pdserve-lib.workerDeployment" (dict "root" $root "group" .) }}
{{- end }}
{{- end -}}

{{/* One worker Deployment: (dict "root" <context> "group" (dict "name" "node0" "replicas" N "nodeSelector" {...})). */}}
{{- define "pdserve-lib.workerDeployment" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $group := .group.name | default "all" -}}
{{- $name := include "pdserve-lib.fullname" $root -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ if .group.name }}{{ printf "%s-%s" $name .group.name }}{{ else }}{{ $name }}{{ end }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "pdserve-lib.labels" $root | nindent 4 }}
    pdserve.io/group: {{ $group }}
  {{- with $v.expectedGoodputPerReplica }}
  annotations:
    pdserve.io/expected-goodput-per-replica: {{ . | quote }}
  {{- end }}
spec:
  replicas: {{ .group.replicas }}
  revisionHistoryLimit: 3
  {{- with $v.updateStrategy }}
  strategy:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "pdserve-lib.selectorLabels" $root | nindent 6 }}
      pdserve.io/group: {{ $group }}
  template:
    metadata:
      labels:
        {{- include "pdserve-lib.labels" $root | nindent 8 }}
        pdserve.io/group: {{ $group }}
      annotations:
        {{- include "pdserve-lib.podAnnotations" $root | nindent 8 }}
    spec:
      {{- include "pdserve-lib.podCommon" $root | trim | nindent 6 }}
      # The KV pool is shared with this node's kvstore daemon: CUDA IPC handles (GPU) or /dev/shm
      # files (CPU), and torch's CUDA IPC reference counters live in /dev/shm too. With hostIPC the
      # runtime gives the pod the host's IPC namespace and /dev/shm, the same as the daemon's. (Do not
      # mount an emptyDir at /dev/shm: it would hide the host's.)
      hostIPC: true
      terminationGracePeriodSeconds: {{ include "pdserve-lib.terminationGracePeriod" $root }}
      {{- with .group.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ $root.Chart.Name }}
          image: {{ include "pdserve-lib.image" $root }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          args:
            {{- include "pdserve-lib.serverArgs" $root | nindent 12 }}
            {{- with include "pdserve-lib.modelArgs" $root | trim }}{{ . | nindent 12 }}{{ end }}
            # This node's kvstore daemon: the node's IP and the DaemonSet's host port.
            - --kvstore=$(K8S_HOST_IP):{{ $v.kvstorePort }}
            - --node-id=$(K8S_NODE_NAME)
            - --device={{ $v.device }}
            - --dtype={{ $v.dtype }}
            - --max-num-seqs={{ $v.maxNumSeqs | int64 }}
            {{- with $v.maxBatchedTokens }}
            - --max-num-batched-tokens={{ . | int64 }}
            {{- end }}
            {{- with $v.gpuMemoryUtilization }}
            - --gpu-memory-utilization={{ . }}
            {{- end }}
            {{- with $v.kvCacheGb }}
            - --kv-cache-gb={{ . }}
            {{- end }}
            {{- with $v.maxModelLen }}
            - --max-model-len={{ . | int64 }}
            {{- end }}
            {{- with $v.streamInterval }}
            - --stream-interval={{ . | int64 }}
            {{- end }}
            {{- /* ranks 1..tp*pp-1 are child processes of this one, in this pod (pdserve-lib.checkParallelism) */}}
            {{- if gt ($v.tensorParallel | default 1 | int) 1 }}
            - --tensor-parallel={{ $v.tensorParallel | int }}
            {{- end }}
            {{- if gt ($v.pipelineParallel | default 1 | int) 1 }}
            - --pipeline-parallel={{ $v.pipelineParallel | int }}
            {{- end }}
            {{- include "pdserve-lib.admissionArgs" $v.admission | nindent 12 }}
            {{- with $v.extraArgs }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          env:
            {{- include "pdserve-lib.env" $root | nindent 12 }}
          ports:
            - name: grpc
              containerPort: {{ $v.port }}
              protocol: TCP
            - name: metrics
              containerPort: {{ $v.metricsPort }}
              protocol: TCP
          {{- include "pdserve-lib.probes" (dict "root" $root "service" $v.healthService) | nindent 10 }}
          {{- with include "pdserve-lib.workerResources" $root | trim }}
          resources:
            {{- . | nindent 12 }}
          {{- end }}
          {{- with $v.securityContext }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          volumeMounts:
            {{- include "pdserve-lib.volumeMounts" $root | nindent 12 }}
      volumes:
        {{- include "pdserve-lib.volumes" $root | nindent 8 }}
{{- end -}}

{{/* The headless Service: one DNS A record per ready worker pod, which the router re-resolves.
Not-ready pods (starting, draining) are left out, so the router only dials serving workers. */}}
{{- define "pdserve-lib.headlessService" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "pdserve-lib.headlessName" (dict "root" . "component" .Chart.Name) }}
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "pdserve-lib.labels" . | nindent 4 }}
spec:
  clusterIP: None
  publishNotReadyAddresses: false
  selector:
    {{- include "pdserve-lib.selectorLabels" . | nindent 4 }}
  ports:
    - name: grpc
      port: {{ .Values.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    - name: metrics
      port: {{ .Values.metricsPort }}
      targetPort: metrics
      protocol: TCP
{{- end -}}

{{/* Voluntary disruptions (node drains) take at most maxUnavailable pods of this component at a time. */}}
{{- define "pdserve-lib.podDisruptionBudget" -}}
{{- if .Values.podDisruptionBudget.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "pdserve-lib.fullname" . }}
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "pdserve-lib.labels" . | nindent 4 }}
spec:
  {{- if hasKey .Values.podDisruptionBudget "minAvailable" }}
  minAvailable: {{ .Values.podDisruptionBudget.minAvailable }}
  {{- else }}
  {{- /* not `default`: it would turn an explicit 0 (block voluntary evictions) into 1 */}}
  maxUnavailable: {{ hasKey .Values.podDisruptionBudget "maxUnavailable" | ternary .Values.podDisruptionBudget.maxUnavailable 1 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "pdserve-lib.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end -}}
