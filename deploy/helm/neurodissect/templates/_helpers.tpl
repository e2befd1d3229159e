{{/* ---------------------------------------------------------------- names */}}

{{/* The chart name, or nameOverride. */}}
{{- define "neurodissect.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "<release>-<name>" (or just the release when it already contains the name), or fullnameOverride.
     Truncated so that "<fullname>-<component>-head-svc" style suffixes still fit in 63 characters. */}}
{{- define "neurodissect.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "neurodissect.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of one component's objects: <fullname>-<component>. Call with (dict "root" $ "component" "gateway"). */}}
{{- define "neurodissect.componentName" -}}
{{- printf "%s-%s" (include "neurodissect.fullname" .root) .component -}}
{{- end -}}

{{- define "neurodissect.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* ---------------------------------------------------------------- labels */}}

{{- define "neurodissect.selectorLabels" -}}
app.kubernetes.io/name: {{ include "neurodissect.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "neurodissect.labels" -}}
helm.sh/chart: {{ include "neurodissect.chart" . }}
{{ include "neurodissect.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: neurodissect
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of one component. Call with (dict "root" $ "component" "gateway"). */}}
{{- define "neurodissect.componentLabels" -}}
{{ include "neurodissect.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "neurodissect.componentSelectorLabels" -}}
{{ include "neurodissect.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* ---------------------------------------------------------------- image, account, security */}}

{{- define "neurodissect.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "neurodissect.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "neurodissect.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Pod-level settings shared by every pod: account, pull secrets, security context. */}}
{{- define "neurodissect.podCommon" -}}
serviceAccountName: {{ include "neurodissect.serviceAccountName" . }}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end -}}

{{- define "neurodissect.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext -}}
{{- end -}}

{{/* ---------------------------------------------------------------- secrets */}}

{{- define "neurodissect.s3SecretName" -}}
{{- default (printf "%s-s3" (include "neurodissect.fullname" .)) .Values.store.existingSecret -}}
{{- end -}}

{{- define "neurodissect.authSecretName" -}}
{{- default (printf "%s-auth" (include "neurodissect.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "neurodissect.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "neurodissect.fullname" .)) .Values.tls.existingSecret -}}
{{- end -}}

{{/* A value for a chart-made Secret: the given one, else the one already in the cluster (so upgrades
     keep it), else a random one. Call with (dict "root" $ "secret" NAME "key" KEY "value" VALUE).
     Returns the base64-encoded value. */}}
{{- define "neurodissect.secretValue" -}}
{{- if .value -}}
{{- .value | b64enc -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .secret -}}
{{- if and $existing $existing.data (hasKey $existing.data .key) -}}
{{- index $existing.data .key -}}
{{- else -}}
{{- randAlphaNum 40 | b64enc -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------- wiring */}}

{{/* host:port of the S3 endpoint: the in-chart MinIO or store.endpoint. */}}
{{- define "neurodissect.s3Endpoint" -}}
{{- if .Values.minio.enabled -}}
{{- if .Values.store.endpoint -}}
{{- fail "store.endpoint is set but minio.enabled is true: set minio.enabled=false to use an external S3 endpoint" -}}
{{- end -}}
{{- printf "%s:%d" (include "neurodissect.componentName" (dict "root" . "component" "minio")) (int .Values.minio.port) -}}
{{- else -}}
{{- required "store.endpoint (host:port of an S3 service) is required when minio.enabled is false" .Values.store.endpoint -}}
{{- end -}}
{{- end -}}

{{- define "neurodissect.storeUrl" -}}
{{- $bucket := required "store.bucket is required" .Values.store.bucket -}}
{{- if .Values.store.prefix -}}
{{- printf "s3://%s/%s" $bucket (trimAll "/" .Values.store.prefix) -}}
{{- else -}}
{{- printf "s3://%s" $bucket -}}
{{- end -}}
{{- end -}}

{{/* Whether the chart creates a RayCluster ("true" or ""). */}}
{{- define "neurodissect.rayClusterEnabled" -}}
{{- if and .Values.ray.cluster.enabled (not .Values.ray.address) -}}true{{- end -}}
{{- end -}}

{{- define "neurodissect.rayClusterName" -}}
{{- include "neurodissect.componentName" (dict "root" . "component" "ray") -}}
{{- end -}}

{{/* RAY_ADDRESS of the explainer: external address, the RayCluster's head (Ray client), or "" (local Ray). */}}
{{- define "neurodissect.rayAddress" -}}
{{- if .Values.ray.address -}}
{{- .Values.ray.address -}}
{{- else if include "neurodissect.rayClusterEnabled" . -}}
{{- printf "ray://%s-head-svc:%d" (include "neurodissect.rayClusterName" .) (int .Values.ray.cluster.clientPort) -}}
{{- end -}}
{{- end -}}

{{/* Directory of the mounted TLS files. */}}
{{- define "neurodissect.tlsDir" -}}/etc/neurodissect/tls{{- end -}}

{{/* ---------------------------------------------------------------- container parts */}}

{{/* Environment every neurodissect container gets besides the ConfigMap: the S3 keys (and, with
     `withToken`, the API token) from Secrets. Call with (dict "root" $ "withToken" true). */}}
{{- define "neurodissect.secretEnv" -}}
- name: NEURODISSECT_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "neurodissect.s3SecretName" .root }}
      key: {{ .root.Values.store.accessKeyKey }}
- name: NEURODISSECT_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "neurodissect.s3SecretName" .root }}
      key: {{ .root.Values.store.secretKeyKey }}
{{- if and .withToken .root.Values.auth.enabled }}
- name: NEURODISSECT_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "neurodissect.authSecretName" .root }}
      key: {{ .root.Values.auth.tokenKey }}
{{- end }}
{{- end -}}

{{/* Writable scratch volumes (the root filesystem is read-only). */}}
{{- define "neurodissect.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.scratch.tmpSizeLimit }}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.scratch.cacheSizeLimit }}
{{- end -}}

{{- define "neurodissect.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: {{ .Values.scratch.cacheDir }}
{{- end -}}

{{/* A memory-backed /dev/shm of `size` (Ray's object store). Call with the size. */}}
{{- define "neurodissect.shmVolume" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ . }}
{{- end -}}

{{/* Probes of a service container: native gRPC health, or TCP when TLS is on (the kubelet's gRPC
     probe cannot speak TLS). Call with (dict "root" $ "port" PORT). */}}
{{- define "neurodissect.probes" -}}
{{- $check := dict "grpc" (dict "port" (int .port)) -}}
{{- if .root.Values.tls.enabled -}}
{{- $check = dict "tcpSocket" (dict "port" "grpc") -}}
{{- end -}}
{{- $probes := .root.Values.probes -}}
startupProbe:
  {{- toYaml (merge (dict) $check $probes.startup) | nindent 2 }}
readinessProbe:
  {{- toYaml (merge (dict) $check $probes.readiness) | nindent 2 }}
livenessProbe:
  {{- toYaml (merge (dict) $check $probes.liveness) | nindent 2 }}
{{- end -}}

{{/* Checksum of the settings, so pods roll when the ConfigMap or chart-made Secrets change. */}}
{{- define "neurodissect.configChecksum" -}}
{{- include (print .Template.BasePath "/configmap.yaml") . | sha256sum -}}
{{- end -}}

{{/* nodeSelector, tolerations and affinity of a pod, from a values block that has them. */}}
{{- define "neurodissect.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* ---------------------------------------------------------------- Ray pods */}}

{{/* Whether Ray's token authentication is on: the chart's RayCluster, or an external cluster
     whose token is given. */}}
{{- define "neurodissect.rayAuthEnabled" -}}
{{- $auth := .Values.ray.auth -}}
{{- if and $auth.enabled (or (include "neurodissect.rayClusterEnabled" .) (and .Values.ray.address (or $auth.existingSecret $auth.token))) -}}true{{- end -}}
{{- end -}}

{{- define "neurodissect.rayAuthSecretName" -}}
{{- .Values.ray.auth.existingSecret | default (printf "%s-ray-auth" (include "neurodissect.fullname" .)) -}}
{{- end -}}

{{/* RAY_AUTH_MODE and RAY_AUTH_TOKEN (Ray reads them itself) of the Ray pods and the explainer. */}}
{{- define "neurodissect.rayAuthEnv" -}}
{{- if include "neurodissect.rayAuthEnabled" . }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "neurodissect.rayAuthSecretName" . }}
      key: {{ .Values.ray.auth.tokenKey }}
{{- end }}
{{- end -}}

{{/* The body of a Ray head or worker container (KubeRay supplies the `ray start` command).
     No API token and no store keys: tasks get the store credentials from the explainer.
     Call with (dict "root" $ "resources" RESOURCES). */}}
{{- define "neurodissect.rayContainer" -}}
image: {{ include "neurodissect.image" .root }}
imagePullPolicy: {{ .root.Values.image.pullPolicy }}
envFrom:
  - configMapRef:
      name: {{ include "neurodissect.fullname" .root }}-settings
{{- with include "neurodissect.rayAuthEnv" .root }}
env:
  {{- . | nindent 2 }}
{{- end }}
resources:
  {{- toYaml .resources | nindent 2 }}
securityContext:
  {{- include "neurodissect.containerSecurityContext" .root | nindent 2 }}
volumeMounts:
  {{- include "neurodissect.scratchMounts" .root | nindent 2 }}
  - name: dshm
    mountPath: /dev/shm
{{- end -}}

{{/* Volumes of a Ray pod. Call with (dict "root" $ "shmSize" SIZE). */}}
{{- define "neurodissect.rayVolumes" -}}
{{ include "neurodissect.scratchVolumes" .root }}
{{ include "neurodissect.shmVolume" .shmSize }}
{{- end -}}

{{/* NEURODISSECT_TORCH_THREADS of an extractor container (call with .Values.extractor): the
     torchThreads value, else the container's CPU limit (or request, without a limit) rounded
     up, so that replicas sharing a node do not oversubscribe its cores. */}}
{{- define "neurodissect.torchThreadsEnv" -}}
- name: NEURODISSECT_TORCH_THREADS
{{- if .torchThreads }}
  value: {{ .torchThreads | int | quote }}
{{- else }}
  valueFrom:
    resourceFieldRef:
      containerName: extractor
      resource: {{ ternary "limits.cpu" "requests.cpu" (hasKey (.resources.limits | default dict) "cpu") }}
      divisor: "1"
{{- end }}
{{- end -}}
