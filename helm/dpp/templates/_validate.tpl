{{/*
Guard rails: rendering fails (helm install/upgrade/template stop) with the reason.
Included once, from configmap.yaml. make deploy-check and tests/deploy prove each.
*/}}
{{- define "dpp.validate" -}}
{{- $env := .Values.environment -}}
{{- if not (has $env (list "dev" "pilot" "production")) -}}
{{- fail (printf "environment must be dev, pilot or production, not %q" $env) -}}
{{- end -}}

{{- /* No secret value in the chart: these live in existingSecret / flower.existingSecret. */ -}}
{{- $secretNames := list "DATABASE_URL" "DATABASE_URL_MIGRATIONS" "REDIS_URL" "DPP_SIGNING_KEY" "FLOWER_BASIC_AUTH" "AWS_ACCESS_KEY_ID" "AWS_SECRET_ACCESS_KEY" "AWS_SESSION_TOKEN" -}}
{{- range $name := $secretNames -}}
{{- if ne (toString (get $.Values.config $name | default "")) "" -}}
{{- fail (printf "config.%s is a secret: put it in the Secret named by existingSecret (%s), never in values" $name $.Values.existingSecret) -}}
{{- end -}}
{{- range $var := $.Values.extraEnv -}}
{{- if and (eq $var.name $name) (hasKey $var "value") -}}
{{- fail (printf "extraEnv %s is a secret: use valueFrom.secretKeyRef, never a literal value" $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- /* Every config value from extraEnv counts too, so an override cannot hide there. */ -}}
{{- $settings := deepCopy .Values.config -}}
{{- range $var := .Values.extraEnv -}}
{{- if hasKey $var "value" -}}{{- $_ := set $settings $var.name (toString $var.value) -}}{{- end -}}
{{- end -}}

{{- if ne $env "dev" -}}
{{- if ne (toString (get $settings "DPP_ENV")) "production" -}}
{{- fail (printf "environment %s needs config.DPP_ENV=production (refuses loopback endpoints, static AWS keys and a missing signing key), not %q" $env (toString (get $settings "DPP_ENV"))) -}}
{{- end -}}
{{- if ne (toString (get $settings "DPP_FAULTS" | default "")) "" -}}
{{- fail (printf "DPP_FAULTS is fault injection for tests; environment %s refuses it" $env) -}}
{{- end -}}
{{- end -}}

{{- if eq $env "production" -}}
{{- range $name := list "SQS_ENDPOINT_URL" "S3_ENDPOINT_URL" -}}
{{- $value := toString (get $settings $name | default "") -}}
{{- if ne $value "" -}}
{{- fail (printf "production talks to AWS's own endpoints: remove the endpoint override %s=%q" $name $value) -}}
{{- end -}}
{{- end -}}
{{- $preflight := toString (get $settings "DPP_BILLING_PREFLIGHT_REQUIRED" | default "") | lower -}}
{{- if not (has $preflight (list "1" "true" "yes" "on")) -}}
{{- fail (printf "production needs config.DPP_BILLING_PREFLIGHT_REQUIRED=1 (readiness checks the billing secrets), not %q" $preflight) -}}
{{- end -}}
{{- end -}}

{{- /* A worker killed mid-run must be past its lease before it is gone for good. */ -}}
{{- $ttl := include "dpp.leaseTtl" . | atoi -}}
{{- if le (int .Values.worker.terminationGracePeriodSeconds) $ttl -}}
{{- fail (printf "worker.terminationGracePeriodSeconds (%d) must be longer than WORKER_LEASE_TTL_SEC (%d)" (int .Values.worker.terminationGracePeriodSeconds) $ttl) -}}
{{- end -}}

{{- $scaling := .Values.worker.autoscaling -}}
{{- if not (has $scaling.mode (list "keda" "hpa" "none")) -}}
{{- fail (printf "worker.autoscaling.mode must be keda, hpa or none, not %q" $scaling.mode) -}}
{{- end -}}
{{- if ne $scaling.mode "none" -}}
{{- if lt (int $scaling.minReplicas) 1 -}}
{{- fail "worker.autoscaling.minReplicas must be at least 1: the sweeps that settle crashed runs run on workers" -}}
{{- end -}}
{{- if lt (int $scaling.maxReplicas) (int $scaling.minReplicas) -}}
{{- fail "worker.autoscaling.maxReplicas must be at least minReplicas" -}}
{{- end -}}
{{- end -}}
{{- if and (eq $scaling.mode "hpa") (not $scaling.hpa.metricName) -}}
{{- fail "worker.autoscaling.mode=hpa needs worker.autoscaling.hpa.metricName (an External metric of the queue depth)" -}}
{{- end -}}
{{- if and (eq $scaling.mode "keda") $scaling.keda.roleArn (eq $scaling.keda.identityOwner "workload") -}}
{{- fail "worker.autoscaling.keda: roleArn and identityOwner=workload exclude each other" -}}
{{- end -}}
{{- if lt (int .Values.beat.replicas) 1 -}}
{{- fail "beat.replicas must be at least 1 (2 for availability: the redbeat lock lets one schedule)" -}}
{{- end -}}
{{- end -}}
