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
Process-alive probe for worker and beat (no HTTP endpoint; `celery inspect ping`
does not work over SQS until issue 7, which replaces this): PID 1 must be the Celery
process of this role, neither a zombie nor stopped. Cheap (no imports) and honest: it
says the process lives, nothing more. Call with (dict "role" "worker" "probe" <values>).
*/}}
{{- define "dpp.processProbe" -}}
exec:
  command:
    - python
    - -c
    - |-
      import sys
      argv = open("/proc/1/cmdline", "rb").read().split(b"\0")
      state = open("/proc/1/stat", "rb").read().rpartition(b")")[2].split()[0]
      celery = any(arg.endswith(b"celery") for arg in argv)
      sys.exit(0 if celery and b"{{ .role }}" in argv and state not in b"ZTtX" else 1)
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
