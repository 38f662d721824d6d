{{/* Names and labels. */}}
{{- define "helora.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "helora.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "helora.selectorLabels" -}}
app.kubernetes.io/name: {{ include "helora.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "helora.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "helora.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: helora
{{- end -}}

{{/* Labels of one component: (dict "root" $ "component" "encoder") */}}
{{- define "helora.componentSelector" -}}
{{ include "helora.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "helora.componentLabels" -}}
{{ include "helora.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "helora.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "helora.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Image of one component: (dict "root" $ "component" "encoder" ["image" "evaluator-cpu"]) */}}
{{- define "helora.image" -}}
{{- $img := .root.Values.image -}}
{{- printf "%s/%s:%s" (trimSuffix "/" $img.repository) (default .component .image) (default .root.Chart.AppVersion $img.tag) -}}
{{- end -}}

{{- define "helora.brokerSecretName" -}}
{{- default (printf "%s-broker" (include "helora.fullname" .)) .Values.broker.auth.existingSecret -}}
{{- end -}}

{{- define "helora.shardClaimName" -}}
{{- default (printf "%s-shards" (include "helora.fullname" .)) .Values.shardVolume.existingClaim -}}
{{- end -}}

{{/*
Environment every service shares. The broker URL is assembled by Kubernetes' $(VAR) expansion from
the two variables that come from the Secret, so no credential appears in the manifest.
*/}}
{{- define "helora.commonEnv" -}}
{{- $b := .Values.broker -}}
- name: HELORA_BROKER_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ include "helora.brokerSecretName" . }}
      key: {{ $b.auth.usernameKey }}
- name: HELORA_BROKER_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "helora.brokerSecretName" . }}
      key: {{ $b.auth.passwordKey }}
- name: HELORA_BROKER_URL
  value: {{ printf "amqp://$(HELORA_BROKER_USERNAME):$(HELORA_BROKER_PASSWORD)@%s:%d/%s" $b.host (int $b.port) (urlquery $b.vhost) | quote }}
- name: HELORA_NAMESPACE
  value: {{ $b.namespace | quote }}
- name: HELORA_MAX_MESSAGE_BYTES
  value: {{ int64 $b.maxMessageBytes | quote }}
- name: HELORA_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: HELORA_METRICS_PORT
  value: {{ int .Values.metrics.port | quote }}
- name: HELORA_METRICS_HOST
  value: "0.0.0.0"
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
- name: HOME
  value: /tmp
{{- end -}}

{{/* Probes on the metrics port: (dict "root" $ "startup" <startupProbe values>) */}}
{{- define "helora.probes" -}}
startupProbe:
  httpGet: {path: /readyz, port: metrics}
  periodSeconds: {{ int .startup.periodSeconds }}
  failureThreshold: {{ int .startup.failureThreshold }}
  timeoutSeconds: 5
readinessProbe:
  httpGet: {path: /readyz, port: metrics}
  periodSeconds: 10
  failureThreshold: 3
  timeoutSeconds: 5
livenessProbe:
  httpGet: {path: /healthz, port: metrics}
  periodSeconds: 20
  failureThreshold: 6
  timeoutSeconds: 10
{{- end -}}

{{/*
The evaluator groups, merged with evaluatorDefaults and checked: names unique, every block range
inside the model, no block in two groups, every block 0..numBlocks-1 in exactly one group.
Returns JSON {"groups": [...]}, each group with lo, hi, label (the queue-name form of the blocks),
backend and deployments (one per shard: name, shard "i/n", queue).
*/}}
{{- define "helora.evaluators" -}}
{{- $n := int .Values.model.numBlocks -}}
{{- $fullname := include "helora.fullname" . -}}
{{- $ns := .Values.broker.namespace -}}
{{- $owner := dict -}}
{{- $names := dict -}}
{{- $groups := list -}}
{{- range $i, $item := .Values.evaluators -}}
  {{- $g := deepCopy $.Values.evaluatorDefaults -}}
  {{- range $k, $v := $item -}}
    {{- if and (kindIs "map" $v) (kindIs "map" (get $g $k)) -}}
      {{- $m := deepCopy (get $g $k) -}}
      {{- range $k2, $v2 := $v }}{{ $_ := set $m $k2 $v2 }}{{ end -}}
      {{- $_ := set $g $k $m -}}
    {{- else -}}
      {{- $_ := set $g $k $v -}}
    {{- end -}}
  {{- end -}}
  {{- if hasKey $names $g.name -}}
    {{- fail (printf "evaluators[%d]: the name %q is used twice; group names must be unique" $i $g.name) -}}
  {{- end -}}
  {{- $_ := set $names $g.name true -}}
  {{- $parts := splitList "-" (toString $g.blocks) -}}
  {{- $lo := atoi (first $parts) -}}
  {{- $hi := atoi (last $parts) -}}
  {{- if gt $lo $hi -}}
    {{- fail (printf "evaluators[%d] (%s): blocks %q runs backwards; write LOW-HIGH" $i $g.name $g.blocks) -}}
  {{- end -}}
  {{- if ge $hi $n -}}
    {{- fail (printf "evaluators[%d] (%s): blocks %q reaches block %d, but the model has blocks 0-%d (model.numBlocks = %d)" $i $g.name $g.blocks $hi (sub $n 1) $n) -}}
  {{- end -}}
  {{- range $b := untilStep $lo (int (add $hi 1)) 1 -}}
    {{- if hasKey $owner (toString $b) -}}
      {{- fail (printf "evaluators: block %d is in both %q and %q; every block must belong to exactly one group" $b (get $owner (toString $b)) $g.name) -}}
    {{- end -}}
    {{- $_ := set $owner (toString $b) $g.name -}}
  {{- end -}}
  {{- if gt (int $g.autoscaling.minReplicas) (int $g.autoscaling.maxReplicas) -}}
    {{- fail (printf "evaluators[%d] (%s): autoscaling.minReplicas %d is above maxReplicas %d" $i $g.name (int $g.autoscaling.minReplicas) (int $g.autoscaling.maxReplicas)) -}}
  {{- end -}}
  {{- $label := ternary (toString $lo) (printf "%d-%d" $lo $hi) (eq $lo $hi) -}}
  {{- $shards := int $g.shards -}}
  {{- $deps := list -}}
  {{- range $s := until $shards -}}
    {{- $dname := ternary (printf "%s-evaluator-%s" $fullname $g.name) (printf "%s-evaluator-%s-s%d" $fullname $g.name $s) (eq $shards 1) -}}
    {{- $deps = append $deps (dict "name" $dname "shard" (printf "%d/%d" $s $shards) "queue" (printf "%s.evaluator.b%s.s%dof%d" $ns $label $s $shards)) -}}
  {{- end -}}
  {{- $backend := $g.backend | default (ternary "cupy" "numpy" (gt (int $g.gpu.count) 0)) -}}
  {{- $_ := set $g "lo" $lo -}}
  {{- $_ := set $g "hi" $hi -}}
  {{- $_ := set $g "label" $label -}}
  {{- $_ := set $g "backend" $backend -}}
  {{- $_ := set $g "deployments" $deps -}}
  {{- $groups = append $groups $g -}}
{{- end -}}
{{- $missing := list -}}
{{- $run := dict -}}
{{- range $b := until (int (add $n 1)) -}}
  {{- if and (lt $b $n) (not (hasKey $owner (toString $b))) -}}
    {{- if not (hasKey $run "lo") }}{{ $_ := set $run "lo" $b }}{{ end -}}
    {{- $_ := set $run "hi" $b -}}
  {{- else if hasKey $run "lo" -}}
    {{- $missing = append $missing (ternary (toString $run.lo) (printf "%d-%d" $run.lo $run.hi) (eq $run.lo $run.hi)) -}}
    {{- $_ := unset $run "lo" -}}
  {{- end -}}
{{- end -}}
{{- if $missing -}}
  {{- fail (printf "evaluators: blocks %s have no evaluator group; the groups must cover every block 0-%d (model.numBlocks = %d) exactly once" (join ", " $missing) (sub $n 1) $n) -}}
{{- end -}}
{{- dict "groups" $groups | toJson -}}
{{- end -}}

{{/* The encoder's shard plan, from the groups: "LO-HI:SHARDS ..." */}}
{{- define "helora.shardPlan" -}}
{{- $plan := list -}}
{{- range $g := (include "helora.evaluators" . | fromJson).groups -}}
{{- $plan = append $plan (printf "%s:%d" $g.label (int $g.shards)) -}}
{{- end -}}
{{- join " " $plan -}}
{{- end -}}
