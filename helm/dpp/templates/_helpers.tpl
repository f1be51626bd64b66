{{/* Names ------------------------------------------------------------------ */}}

{{- define "dpp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dpp.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* <fullname>-<component>, e.g. dpp-api. Call with (dict "root" $ "component" "api"). */}}
{{- define "dpp.componentName" -}}
{{- printf "%s-%s" (include "dpp.fullname" .root | trunc 56 | trimSuffix "-") .component -}}
{{- end -}}

{{/* Labels ----------------------------------------------------------------- */}}

{{/* Call with (dict "root" $ "component" "api"). */}}
{{- define "dpp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dpp.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "dpp.labels" -}}
{{ include "dpp.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: dpp
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | quote }}
dpp.decisionproof.io/environment: {{ .root.Values.environment }}
{{- end -}}

{{/* Image ------------------------------------------------------------------ */}}

{{- define "dpp.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/* ServiceAccount of a role. Call with (dict "root" $ "component" "api"). */}}
{{- define "dpp.serviceAccountName" -}}
{{- if .root.Values.serviceAccount.create -}}
{{ include "dpp.componentName" . }}
{{- else -}}
default
{{- end -}}
{{- end -}}

{{/* The lease TTL the workers use (dpp/config.py default: 60). */}}
{{- define "dpp.leaseTtl" -}}
{{- $ttl := toString (default "" .Values.config.WORKER_LEASE_TTL_SEC) -}}
{{- if eq $ttl "" -}}60{{- else -}}{{ $ttl | atoi }}{{- end -}}
{{- end -}}

{{/* Pod parts ---------------------------------------------------------------- */}}

{{/* Pod template metadata. Call with (dict "root" $ "component" "api"). */}}
{{- define "dpp.podMetadata" -}}
labels:
  {{- include "dpp.labels" . | nindent 2 }}
  {{- with .root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  checksum/config: {{ include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum }}
  {{- with .root.Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* Pod spec fields every role shares. Call with (dict "root" $ "component" "api"). */}}
{{- define "dpp.podCommon" -}}
{{- $root := .root -}}
serviceAccountName: {{ include "dpp.serviceAccountName" . }}
{{- /* Nothing in DPP talks to the Kubernetes API. */}}
automountServiceAccountToken: false
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with $root.Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if $root.Values.topologySpread }}
topologySpreadConstraints:
  {{- range $key := list "topology.kubernetes.io/zone" "kubernetes.io/hostname" }}
  - maxSkew: 1
    topologyKey: {{ $key }}
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "dpp.selectorLabels" $ | nindent 8 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* Container fields every role shares: image, settings, security, /tmp. */}}
{{- define "dpp.containerCommon" -}}
image: {{ include "dpp.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
envFrom:
  - configMapRef:
      name: {{ include "dpp.fullname" . }}
  - secretRef:
      name: {{ required "existingSecret: name the Secret with DATABASE_URL, REDIS_URL and DPP_SIGNING_KEY" .Values.existingSecret }}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
{{- end -}}

{{/* Variables every role gets after envFrom (so they win). */}}
{{- define "dpp.envCommon" -}}
# The root filesystem is read-only: anything that writes under $HOME (gunicorn's
# control socket, botocore's caches) writes to the /tmp emptyDir instead.
- name: HOME
  value: /tmp
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Worker and beat: DPP_METRICS_PORT serves /metrics and /healthz (docs/operations.md), with
the samples of all the role's processes aggregated in an in-memory PROMETHEUS_MULTIPROC_DIR.
*/}}
{{- define "dpp.metricsEnv" -}}
- name: DPP_METRICS_PORT
  value: {{ .Values.metrics.port | quote }}
- name: PROMETHEUS_MULTIPROC_DIR
  value: /run/prometheus
{{- end -}}

{{- define "dpp.metricsPort" -}}
- name: metrics
  containerPort: {{ .Values.metrics.port }}
  protocol: TCP
{{- end -}}

{{- define "dpp.metricsVolume" -}}
- name: prometheus
  emptyDir:
    medium: Memory
    sizeLimit: 64Mi
{{- end -}}

{{- define "dpp.metricsMount" -}}
- name: prometheus
  mountPath: /run/prometheus
{{- end -}}

{{/* An HTTP probe on /healthz; call with (dict "probe" <values>). */}}
{{- define "dpp.healthzProbe" -}}
httpGet:
  path: /healthz
  port: metrics
{{- with .probe }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes every role mounts: /tmp (read-only root filesystem). */}}
{{- define "dpp.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 256Mi
{{- end -}}

{{- define "dpp.tmpMount" -}}
- name: tmp
  mountPath: /tmp
{{- end -}}
