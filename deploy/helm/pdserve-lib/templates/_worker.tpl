{{/*
The engine workers (prefill, decode): their workloads, the headless Service the router resolves,
and the PodDisruptionBudget.

Why Deployments, not StatefulSets, for instances of one pod: a worker has no identity the system
depends on. The router finds workers through the headless Service's DNS records (pod IPs of ready
pods) and tells them apart by the address it dialled; the KV cache lives only as long as the
process; the weights are read-only from a shared volume; a replacement pod on another node is as
good as the old one. A StatefulSet would add ordered, one-at-a-time start-up (minutes per GPU
worker loading weights) and per-pod volumes nobody needs.

An instance over several pods (podsPerReplica > 1) is different: the pods other than the worker's
(followers) must find "their" worker by a stable name. Those instances are StatefulSets
(pdserve-lib.multiPodInstances): the workers ("leaders", pod 0 of each instance) one StatefulSet,
and pod J of every instance one StatefulSet per J, so that ordinal i of each belongs to instance i
and pod J can be pinned to its own node.
*/}}

{{/*
Parallelism of one instance. The worker process is rank 0 and starts the ranks of its own pod as
its child processes in the same container, rank r on cuda:(first + r) (first: --device's index, 0
for plain "cuda"). With podsPerReplica P = 1 the pod holds all tp*pp ranks. With P > 1 each pod
holds tp*pp/P consecutive ranks, i.e. pp/P whole pipeline stages (a tensor-parallel group is never
split across pods): pod 0 is the worker with --pods=P, pods 1..P-1 run services.engine.follower,
which starts its pod's ranks on cuda:0.. of that pod. So P must divide pipelineParallel.
(values.schema.json keeps all three at 1 or more.)
*/}}
{{- define "pdserve-lib.checkParallelism" -}}
{{- $v := .Values -}}
{{- $pods := $v.podsPerReplica | default 1 | int -}}
{{- if gt $pods 1 -}}
{{- $tp := $v.tensorParallel | default 1 | int -}}
{{- $pp := $v.pipelineParallel | default 1 | int -}}
{{- $ranks := mul $tp $pp -}}
{{- if mod $ranks $pods -}}
{{- fail (printf "%s.podsPerReplica is %d, but an instance has %d ranks (tensorParallel %d x pipelineParallel %d), which do not split evenly over %d pods: every pod of an instance holds the same number of ranks, whole pipeline stages. Set %s.podsPerReplica to a divisor of pipelineParallel (1: the whole instance in one pod); docs/deploy.md, 'Tensor and pipeline parallelism'." $.Chart.Name $pods $ranks $tp $pp $pods $.Chart.Name) -}}
{{- end -}}
{{- if mod $pp $pods -}}
{{- fail (printf "%s.podsPerReplica is %d, but pipelineParallel is %d: each pod of an instance holds whole pipeline stages (pipelineParallel / podsPerReplica of them; a stage's %d tensor-parallel ranks are never split across pods), so pipelineParallel must be a multiple of podsPerReplica. Set %s.podsPerReplica to a divisor of %d (1: the whole instance in one pod); docs/deploy.md, 'Tensor and pipeline parallelism'." $.Chart.Name $pods $pp $tp $.Chart.Name $pp) -}}
{{- end -}}
{{- $rendezvous := $v.rendezvousPort | int -}}
{{- $taken := dict "port" $v.port "metricsPort" $v.metricsPort -}}
{{- with include "pdserve-lib.tls" . }}{{ $_ := set $taken "global.tls.healthPort" (fromYaml .).healthPort }}{{ end -}}
{{- range $key := keys $taken | sortAlpha -}}
{{- $port := index $taken $key | int -}}
{{- if or (eq $port $rendezvous) (eq $port (add1 $rendezvous | int)) -}}
{{- fail (printf "%s.rendezvousPort is %d: the worker listens there for its followers and on the next port (%d) for the ranks' process-group store, so neither may be %s (%d)" $.Chart.Name $rendezvous (add1 $rendezvous | int) (ternary $key (printf "%s.%s" $.Chart.Name $key) (hasPrefix "global." $key)) $port) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Processes (ranks) of one instance: tensorParallel x pipelineParallel. */}}
{{- define "pdserve-lib.ranks" -}}
{{- mul (.Values.tensorParallel | default 1 | int) (.Values.pipelineParallel | default 1 | int) -}}
{{- end -}}

{{/* Pods of one instance: podsPerReplica (1 unless a pipeline spans pods). */}}
{{- define "pdserve-lib.pods" -}}
{{- .Values.podsPerReplica | default 1 | int -}}
{{- end -}}

{{/*
A worker pod's resources: (dict "root" <context> "follower" <bool>). `resources` as given, plus on
CUDA the GPU limit. Unset, it is one GPU per rank of the pod: tensorParallel x pipelineParallel /
podsPerReplica, plus --device's index on the worker (its ranks run on cuda:first ..; a follower's
on cuda:0 ..); set (the planner writes it), it must cover them (the pod sees its GPUs as cuda:0..).
On the CPU device no GPU is added: the ranks share the pod's CPUs.
*/}}
{{- define "pdserve-lib.workerResources" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $resources := deepCopy ($v.resources | default dict) -}}
{{- if hasPrefix "cuda" $v.device -}}
  {{- $pods := include "pdserve-lib.pods" $root | int -}}
  {{- $ranks := div (include "pdserve-lib.ranks" $root | int) $pods | int -}}
  {{- $first := 0 -}}
  {{- if and (contains ":" $v.device) (not .follower) -}}{{- $first = regexReplaceAll "^cuda:" $v.device "" | int -}}{{- end -}}
  {{- $limits := $resources.limits | default dict -}}
  {{- $gpus := index $limits "nvidia.com/gpu" -}}
  {{- if kindIs "invalid" $gpus -}}
    {{- $gpus = add $first $ranks -}}
  {{- else if lt (int $gpus) (add $first $ranks | int) -}}
    {{- if eq $pods 1 -}}
    {{- fail (printf "%s.resources.limits.nvidia.com/gpu is %d, but the instance's %d ranks (tensorParallel x pipelineParallel) run on cuda:%d..cuda:%d, one GPU each, all in this pod: ask for %d GPUs, or leave the key unset (the chart then asks for one per rank)." $root.Chart.Name (int $gpus) $ranks $first (sub (add $first $ranks) 1 | int) (add $first $ranks | int)) -}}
    {{- else -}}
    {{- fail (printf "%s.resources.limits.nvidia.com/gpu is %d, but each of an instance's %d pods holds %d ranks (tensorParallel x pipelineParallel / podsPerReplica), the %s's on cuda:%d..cuda:%d, one GPU each: ask for %d GPUs per pod, or leave the key unset (the chart then asks for one per rank of the pod)." $root.Chart.Name (int $gpus) $pods $ranks (ternary "follower" "worker" (.follower | default false)) $first (sub (add $first $ranks) 1 | int) (add $first $ranks | int)) -}}
    {{- end -}}
  {{- end -}}
  {{- $_ := set $limits "nvidia.com/gpu" (int $gpus) -}}
  {{- $_ := set $resources "limits" $limits -}}
{{- end -}}
{{- with $resources }}{{ toYaml . }}{{ end -}}
{{- end -}}

{{/*
Every workload of a worker role: (dict "root" <the worker chart's context> "placement" <placement or nil>).

Without a placement: one Deployment of replicaCount pods, placed by the scheduler.
With the planner's placement (the umbrella chart's top-level `placement`, enabled and listing
instances of this role): one Deployment per planned node, "<name>-node<N>", with as many replicas as
instances the plan puts there and a nodeSelector on placement.nodeLabel=<N>. Their pods carry the
same component labels, so the headless Service and the PodDisruptionBudget cover all of them.
With podsPerReplica > 1: StatefulSets instead (pdserve-lib.multiPodInstances).
*/}}
{{- define "pdserve-lib.workerDeployments" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- include "pdserve-lib.checkParallelism" $root -}}
{{- $placement := .placement | default dict -}}
{{- if gt (include "pdserve-lib.pods" $root | int) 1 -}}
{{- include "pdserve-lib.multiPodInstances" (dict "root" $root "placement" $placement) -}}
{{- else -}}
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
      {{- include "pdserve-lib.workerPodSpec" (dict "root" $root "nodeSelector" .group.nodeSelector) | nindent 6 }}
{{- end -}}

{{/* The pod spec of a worker (an instance's pod 0): (dict "root" <context> "nodeSelector" {...}). */}}
{{- define "pdserve-lib.workerPodSpec" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $pods := include "pdserve-lib.pods" $root | int -}}
{{- include "pdserve-lib.podCommon" $root | trim }}
# The KV pool is shared with this node's kvstore daemon: CUDA IPC handles (GPU) or /dev/shm
# files (CPU), and torch's CUDA IPC reference counters live in /dev/shm too. With hostIPC the
# runtime gives the pod the host's IPC namespace and /dev/shm, the same as the daemon's. (Do not
# mount an emptyDir at /dev/shm: it would hide the host's.)
hostIPC: true
terminationGracePeriodSeconds: {{ include "pdserve-lib.terminationGracePeriod" $root }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: {{ $root.Chart.Name }}
    image: {{ include "pdserve-lib.image" $root }}
    imagePullPolicy: {{ $v.image.pullPolicy }}
    args:
      {{- include "pdserve-lib.serverArgs" $root | nindent 6 }}
      {{- with include "pdserve-lib.modelArgs" $root | trim }}{{ . | nindent 6 }}{{ end }}
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
      {{- /* the ranks of this pod are child processes of this one (pdserve-lib.checkParallelism) */}}
      {{- if gt ($v.tensorParallel | default 1 | int) 1 }}
      - --tensor-parallel={{ $v.tensorParallel | int }}
      {{- end }}
      {{- if gt ($v.pipelineParallel | default 1 | int) 1 }}
      - --pipeline-parallel={{ $v.pipelineParallel | int }}
      {{- end }}
      {{- if gt $pods 1 }}
      # the instance's other {{ sub $pods 1 }} pod(s) (services.engine.follower) connect here; the ranks' store listens on the next port
      - --pods={{ $pods }}
      - --rendezvous-port={{ $v.rendezvousPort | int }}
      {{- end }}
      {{- include "pdserve-lib.admissionArgs" $v.admission | nindent 6 }}
      {{- with $v.extraArgs }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    env:
      {{- include "pdserve-lib.env" $root | nindent 6 }}
    ports:
      - name: grpc
        containerPort: {{ $v.port }}
        protocol: TCP
      - name: metrics
        containerPort: {{ $v.metricsPort }}
        protocol: TCP
      {{- if gt $pods 1 }}
      - name: rendezvous
        containerPort: {{ $v.rendezvousPort | int }}
        protocol: TCP
      - name: dist-store
        containerPort: {{ add1 ($v.rendezvousPort | int) }}
        protocol: TCP
      {{- end }}
    {{- include "pdserve-lib.probes" (dict "root" $root "service" $v.healthService) | nindent 4 }}
    {{- with include "pdserve-lib.workerResources" (dict "root" $root) | trim }}
    resources:
      {{- . | nindent 6 }}
    {{- end }}
    {{- with $v.securityContext }}
    securityContext:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    volumeMounts:
      {{- include "pdserve-lib.volumeMounts" $root | nindent 6 }}
volumes:
  {{- include "pdserve-lib.volumes" $root | nindent 2 }}
{{- end -}}

{{/*
Instances of podsPerReplica P > 1 pods: (dict "root" <context> "placement" <placement or nil>).

For each group of instances (all of them; with the planner's placement, those whose pods the plan
puts on the same nodes, "<name>-node<n0>-<n1>..."):
- the workers (pod 0 of each instance, "leaders"): a StatefulSet "<name>[-<group>]" of one pod per
  instance, the worker container as with one pod, plus --pods=P --rendezvous-port=<rendezvousPort>;
- for J = 1..P-1, pod J of each instance: a StatefulSet "<leaders>-pod<J>" of as many pods, ordinal
  i belonging to instance i (the leader "<leaders>-<i>"), running services.engine.follower.
Both are governed by the "<name>-rendezvous" headless Service, which publishes not-ready pods: a
worker is not ready until its followers joined, so they must reach it before. The router's
headless Service selects leaders only (pdserve.io/instance-pod: "0").

With a placement, pod J of an instance is pinned to the node of its stages (stages
J*pp/P .. (J+1)*pp/P - 1, which the plan must put on one node); otherwise the scheduler places
every pod where it finds tp*pp/P free GPUs (the same node or not: the ranks talk over the pod
network either way).
*/}}
{{- define "pdserve-lib.multiPodInstances" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $placement := .placement -}}
{{- $pods := include "pdserve-lib.pods" $root | int -}}
{{- $pp := $v.pipelineParallel | default 1 | int -}}
{{- $stagesPerPod := div $pp $pods | int -}}
{{- $base := $v.nodeSelector | default dict -}}
{{- $groups := list -}}
{{- if and $placement.enabled $placement.instances -}}
  {{- $count := 0 -}}
  {{- $perKey := dict -}}
  {{- range $placement.instances -}}
    {{- if eq .role $root.Chart.Name -}}
      {{- $instance := . -}}
      {{- if ne (len .stages) $pp -}}
        {{- fail (printf "placement.instances: %s instance %v has %d stages, but %s.pipelineParallel is %d: re-run the planner" $root.Chart.Name (ternary $instance.index $count (hasKey $instance "index")) (len .stages) $root.Chart.Name $pp) -}}
      {{- end -}}
      {{- $nodes := list -}}
      {{- range $j := until $pods -}}
        {{- $first := index $instance.stages (mul $j $stagesPerPod) -}}
        {{- range $s := until $stagesPerPod -}}
          {{- $stage := index $instance.stages (add (mul $j $stagesPerPod) $s) -}}
          {{- if ne (toString $stage.node) (toString $first.node) -}}
            {{- fail (printf "placement.instances: %s instance %v puts stages %d..%d on nodes %v and %v, but they are one pod (podsPerReplica %d: pod %d holds stages %d..%d), which runs on one node: re-run the planner (docs/deploy.md, 'Tensor and pipeline parallelism')" $root.Chart.Name (ternary $instance.index $count (hasKey $instance "index")) (mul $j $stagesPerPod) (sub (mul (add1 $j) $stagesPerPod) 1) $first.node $stage.node $pods $j (mul $j $stagesPerPod) (sub (mul (add1 $j) $stagesPerPod) 1)) -}}
          {{- end -}}
        {{- end -}}
        {{- $nodes = append $nodes (toString $first.node) -}}
      {{- end -}}
      {{- $key := join "-" $nodes -}}
      {{- $_ := set $perKey $key (add1 (get $perKey $key | default 0)) -}}
      {{- $count = add1 $count -}}
    {{- end -}}
  {{- end -}}
  {{- if and $count (ne (int $count) (int $v.replicaCount)) -}}
    {{- fail (printf "%s.replicaCount is %d but placement.instances places %d %s instances: re-run the planner, or set placement.enabled=false to scale freely." $root.Chart.Name (int $v.replicaCount) (int $count) $root.Chart.Name) -}}
  {{- end -}}
  {{- range $key := keys $perKey | sortAlpha -}}
    {{- $selectors := list -}}
    {{- range $node := splitList "-" $key -}}
      {{- $selectors = append $selectors (merge (dict $placement.nodeLabel $node) $base) -}}
    {{- end -}}
    {{- $groups = append $groups (dict "name" (printf "node%s" $key) "replicas" (get $perKey $key) "nodeSelectors" $selectors) -}}
  {{- end -}}
{{- end -}}
{{- if not $groups -}}
  {{- $selectors := list -}}
  {{- range until $pods }}{{ $selectors = append $selectors $base }}{{ end -}}
  {{- $groups = list (dict "name" "" "replicas" $v.replicaCount "nodeSelectors" $selectors) -}}
{{- end -}}
{{- range $groups }}
---
{{ include "pdserve-lib.leaderStatefulSet" (dict "root" $root "group" .) }}
{{- $group := . }}
{{- range $j := untilStep 1 $pods 1 }}
---
{{ include "pdserve-lib.followerStatefulSet" (dict "root" $root "group" $group "pod" $j) }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Names of a group's StatefulSets: (dict "root" <context> "group" <group> "pod" J); J = 0: the leaders. */}}
{{- define "pdserve-lib.statefulSetName" -}}
{{- $name := include "pdserve-lib.fullname" .root -}}
{{- if .group.name }}{{ $name = printf "%s-%s" $name .group.name }}{{ end -}}
{{- if .pod }}{{ $name = printf "%s-pod%d" $name (int .pod) }}{{ end -}}
{{- /* the controller-revision-hash label is "<name>-<10 characters>", at most 63 */ -}}
{{- if gt (len $name) 52 -}}
{{- fail (printf "the StatefulSet name %q is longer than 52 characters (Kubernetes labels its pods with it plus a hash): use a shorter global.namePrefix" $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{/* The headless Service governing the StatefulSets of multi-pod instances. */}}
{{- define "pdserve-lib.rendezvousName" -}}
{{- printf "%s-rendezvous" (include "pdserve-lib.fullname" .) -}}
{{- end -}}

{{/* The workers of multi-pod instances (pod 0 of each): (dict "root" <context> "group" <group>). */}}
{{- define "pdserve-lib.leaderStatefulSet" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $group := .group.name | default "all" -}}
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: {{ include "pdserve-lib.statefulSetName" (dict "root" $root "group" .group "pod" 0) }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "pdserve-lib.labels" $root | nindent 4 }}
    pdserve.io/group: {{ $group }}
    pdserve.io/instance-pod: "0"
  {{- with $v.expectedGoodputPerReplica }}
  annotations:
    pdserve.io/expected-goodput-per-replica: {{ . | quote }}
  {{- end }}
spec:
  replicas: {{ .group.replicas }}
  serviceName: {{ include "pdserve-lib.rendezvousName" $root }}
  {{- /* all at once: a worker waits for its followers, and loading weights takes minutes */}}
  podManagementPolicy: Parallel
  revisionHistoryLimit: 3
  {{- include "pdserve-lib.statefulSetUpdate" $root | nindent 2 }}
  selector:
    matchLabels:
      {{- include "pdserve-lib.selectorLabels" $root | nindent 6 }}
      pdserve.io/group: {{ $group }}
      pdserve.io/instance-pod: "0"
  template:
    metadata:
      labels:
        {{- include "pdserve-lib.labels" $root | nindent 8 }}
        pdserve.io/group: {{ $group }}
        pdserve.io/instance-pod: "0"
      annotations:
        {{- include "pdserve-lib.podAnnotations" $root | nindent 8 }}
    spec:
      {{- include "pdserve-lib.workerPodSpec" (dict "root" $root "nodeSelector" (index .group.nodeSelectors 0)) | nindent 6 }}
{{- end -}}

{{/* A StatefulSet's updateStrategy from the Deployment-shaped `updateStrategy` value: rolling, one
pod at a time from the highest ordinal (rollingUpdate.maxUnavailable is passed on; Kubernetes
honours it with the MaxUnavailableStatefulSet feature gate); maxSurge has no StatefulSet meaning. */}}
{{- define "pdserve-lib.statefulSetUpdate" -}}
{{- $unavailable := dig "rollingUpdate" "maxUnavailable" nil (.Values.updateStrategy | default dict) -}}
updateStrategy:
  type: RollingUpdate
  {{- if not (kindIs "invalid" $unavailable) }}
  rollingUpdate:
    maxUnavailable: {{ $unavailable }}
  {{- end }}
{{- end -}}

{{/*
Pod J (1..P-1) of every instance of a group: (dict "root" <context> "group" <group> "pod" J).

The follower (services.engine.follower) connects to its instance's worker, "<leaders>-<i>" for its
own ordinal i, gets the model path and engine config from it, and starts ranks J*n..J*n+n-1 (n =
tp*pp/P) on cuda:0..n-1: so it gets the worker's volumes (the model at the same path), env,
hostIPC and certificates, and one GPU per rank. It serves no gRPC and no metrics: no ports, no
Prometheus annotations, no probes (it exits when its worker's connection ends or a rank dies, and
the kubelet restarts it). It ignores SIGTERM: when its instance is scaled down or upgraded, its
worker drains first and then ends the connection, which stops the follower (SIGKILL after its
grace period, 10 s longer than the worker's, otherwise).
*/}}
{{- define "pdserve-lib.followerStatefulSet" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $group := .group.name | default "all" -}}
{{- $j := int .pod -}}
{{- $g := $v.global | default dict -}}
{{- $leaders := include "pdserve-lib.statefulSetName" (dict "root" $root "group" .group "pod" 0) -}}
{{- $leader := printf "%s-${K8S_POD_NAME##*-}.%s.%s.svc.%s:%d" $leaders (include "pdserve-lib.rendezvousName" $root) $root.Release.Namespace ($g.clusterDomain | default "cluster.local") ($v.rendezvousPort | int) -}}
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: {{ include "pdserve-lib.statefulSetName" (dict "root" $root "group" .group "pod" $j) }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "pdserve-lib.labels" $root | nindent 4 }}
    pdserve.io/group: {{ $group }}
    pdserve.io/instance-pod: {{ $j | quote }}
spec:
  replicas: {{ .group.replicas }}
  serviceName: {{ include "pdserve-lib.rendezvousName" $root }}
  podManagementPolicy: Parallel
  revisionHistoryLimit: 3
  {{- include "pdserve-lib.statefulSetUpdate" $root | nindent 2 }}
  selector:
    matchLabels:
      {{- include "pdserve-lib.selectorLabels" $root | nindent 6 }}
      pdserve.io/group: {{ $group }}
      pdserve.io/instance-pod: {{ $j | quote }}
  template:
    metadata:
      labels:
        {{- include "pdserve-lib.labels" $root | nindent 8 }}
        pdserve.io/group: {{ $group }}
        pdserve.io/instance-pod: {{ $j | quote }}
      {{- with $v.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- include "pdserve-lib.podCommon" $root | trim | nindent 6 }}
      # The same host IPC namespace as the workers' (the ranks' KV pools, CUDA IPC counters).
      hostIPC: true
      # longer than its worker's: the worker drains, then ends the connection, which stops this pod
      terminationGracePeriodSeconds: {{ add (include "pdserve-lib.terminationGracePeriod" $root | int) 10 }}
      {{- with index .group.nodeSelectors $j }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ $root.Chart.Name }}-follower
          image: {{ include "pdserve-lib.image" $root }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          # Its instance is its ordinal, the suffix of its pod name: the worker "<leaders>-<ordinal>".
          command:
            - /bin/sh
            - -c
            - {{ printf "trap '' TERM; exec python -m services.engine.follower --leader=%s \"$@\"" $leader | toJson }}
            - follower
          args:
            - --pod={{ $j }}
            {{- with include "pdserve-lib.tls" $root }}
            # mutual TLS to its worker, with the worker's certificates and the name its certificate carries
            - --tls-cert=/etc/pdserve/tls/tls.crt
            - --tls-key=/etc/pdserve/tls/tls.key
            - --tls-ca=/etc/pdserve/tls/ca.crt
            - --tls-server-name={{ (fromYaml .).serverName }}
            {{- end }}
          env:
            - name: K8S_POD_NAME
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
            {{- include "pdserve-lib.env" $root | nindent 12 }}
          {{- with include "pdserve-lib.workerResources" (dict "root" $root "follower" true) | trim }}
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
Not-ready pods (starting, draining) are left out, so the router only dials serving workers. With
multi-pod instances it selects the workers only (pod 0 of each instance), not their followers. */}}
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
    {{- if gt (include "pdserve-lib.pods" . | int) 1 }}
    pdserve.io/instance-pod: "0"
    {{- end }}
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

{{/* With multi-pod instances: the headless Service governing their StatefulSets, which gives every
pod a DNS name, "<pod>.<this>.<namespace>.svc.<clusterDomain>", ready or not (a worker becomes
ready only once its followers have joined it). Followers dial their worker's name on the rendezvous
port; the ranks' process-group store is on the next one. */}}
{{- define "pdserve-lib.rendezvousService" -}}
{{- if gt (include "pdserve-lib.pods" . | int) 1 }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "pdserve-lib.rendezvousName" . }}
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "pdserve-lib.labels" . | nindent 4 }}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  selector:
    {{- include "pdserve-lib.selectorLabels" . | nindent 4 }}
  ports:
    - name: rendezvous
      port: {{ .Values.rendezvousPort | int }}
      targetPort: {{ .Values.rendezvousPort | int }}
      protocol: TCP
    - name: dist-store
      port: {{ add1 (.Values.rendezvousPort | int) }}
      targetPort: {{ add1 (.Values.rendezvousPort | int) }}
      protocol: TCP
{{- end }}
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
