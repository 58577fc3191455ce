{{/* Names, labels, the image, and what the edge and ingest pods share. */}}

{{- define "crm-events.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "crm-events.fullname" -}}
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

{{/* "<fullname>-<component>", kept within 63 characters. */}}
{{- define "crm-events.componentName" -}}
{{- printf "%s-%s" (include "crm-events.fullname" .root | trunc (int (sub 62 (len .component))) | trimSuffix "-") .component -}}
{{- end -}}

{{- define "crm-events.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "crm-events.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: crm-events
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "crm-events.selectorLabels" -}}
app.kubernetes.io/name: {{ include "crm-events.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of one component: (dict "root" $ "component" "edge"). */}}
{{- define "crm-events.componentLabels" -}}
{{ include "crm-events.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "crm-events.componentSelectorLabels" -}}
{{ include "crm-events.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The Service label whose value becomes Prometheus's job label (ServiceMonitor jobLabel):
crm-events-edge and crm-events-ingest, the jobs monitoring/'s rules select. */}}
{{- define "crm-events.jobLabelKey" -}}crm-events/job{{- end -}}

{{- define "crm-events.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "crm-events.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "crm-events.image" -}}
{{- $image := .Values.image -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Where every secret file is mounted (one projected volume per pod). */}}
{{- define "crm-events.secretsDir" -}}/var/run/secrets/crm-events{{- end -}}

{{/* The chart's own Secret: the secrets given inline in values. */}}
{{- define "crm-events.secretName" -}}{{ include "crm-events.fullname" . }}{{- end -}}

{{/* "true" when the edges fetch their keys from an identity provider (auth.jwt.oidcIssuer or
auth.jwt.jwksUrl), else empty. */}}
{{- define "crm-events.remoteKeys" -}}
{{- $jwt := .Values.auth.jwt -}}
{{- if and (eq .Values.auth.mode "jwt") (or $jwt.oidcIssuer $jwt.jwksUrl) -}}true{{- end -}}
{{- end -}}

{{/* The inline secrets, as the chart's Secret's data keys (empty ones left out). */}}
{{- define "crm-events.inlineSecrets" -}}
{{- $v := .Values -}}
{{- $data := dict -}}
{{- if and (eq $v.auth.mode "jwt") $v.auth.jwt.key (not $v.auth.jwt.existingSecret) -}}
{{- $_ := set $data "jwt-key" $v.auth.jwt.key -}}
{{- end -}}
{{- if and $v.redis.password (not $v.redis.existingSecret) -}}
{{- $_ := set $data "redis-password" $v.redis.password -}}
{{- end -}}
{{- if and $v.redis.sentinel.password (not $v.redis.sentinel.existingSecret) -}}
{{- $_ := set $data "redis-sentinel-password" $v.redis.sentinel.password -}}
{{- end -}}
{{- if and $v.kafka.sasl.password (not $v.kafka.sasl.existingSecret) -}}
{{- $_ := set $data "kafka-sasl-password" $v.kafka.sasl.password -}}
{{- end -}}
{{- toJson $data -}}
{{- end -}}

{{/* (secret name, key) of one secret value: the user's Secret when named, else the chart's.
Arguments: (dict "root" $ "existing" <name> "existingKey" <key> "inlineKey" <key>). */}}
{{- define "crm-events.secretRef" -}}
{{- if .existing -}}
{{- toJson (dict "name" .existing "key" .existingKey) -}}
{{- else -}}
{{- toJson (dict "name" (include "crm-events.secretName" .root) "key" .inlineKey) -}}
{{- end -}}
{{- end -}}

{{/* The secret files one component needs, as a list of {name, key, path, env}: the Secret
and key it comes from, its path under secretsDir, and the *_FILE setting that names it.
Argument: (dict "root" $ "component" "edge"|"ingest"). */}}
{{- define "crm-events.secretFiles" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $files := list -}}
{{- /* An identity provider's keys come over HTTP: no key file then. */ -}}
{{- if and (eq .component "edge") (eq $v.auth.mode "jwt") (not (include "crm-events.remoteKeys" $root)) -}}
{{- $jwt := $v.auth.jwt -}}
{{- $kinds := dict "hs256" (list "jwt/secret" "CRM_EVENTS_JWT_SECRET_FILE") "publicKey" (list "jwt/public-key.pem" "CRM_EVENTS_JWT_PUBLIC_KEY_FILE") "jwks" (list "jwt/jwks.json" "CRM_EVENTS_JWT_JWKS_FILE") -}}
{{- $kind := get $kinds $jwt.keyType -}}
{{- $ref := include "crm-events.secretRef" (dict "root" $root "existing" $jwt.existingSecret "existingKey" $jwt.existingSecretKey "inlineKey" "jwt-key") | fromJson -}}
{{- $files = append $files (merge (dict "path" (index $kind 0) "env" (index $kind 1)) $ref) -}}
{{- end -}}
{{- if or $v.redis.password $v.redis.existingSecret -}}
{{- $ref := include "crm-events.secretRef" (dict "root" $root "existing" $v.redis.existingSecret "existingKey" $v.redis.existingSecretKey "inlineKey" "redis-password") | fromJson -}}
{{- $files = append $files (merge (dict "path" "redis/password" "env" "CRM_EVENTS_REDIS_PASSWORD_FILE") $ref) -}}
{{- end -}}
{{- $sentinel := $v.redis.sentinel -}}
{{- if or $sentinel.password $sentinel.existingSecret -}}
{{- $ref := include "crm-events.secretRef" (dict "root" $root "existing" $sentinel.existingSecret "existingKey" $sentinel.existingSecretKey "inlineKey" "redis-sentinel-password") | fromJson -}}
{{- $files = append $files (merge (dict "path" "redis/sentinel-password" "env" "CRM_EVENTS_REDIS_SENTINEL_PASSWORD_FILE") $ref) -}}
{{- end -}}
{{- with $v.redis.tls.existingSecret -}}
{{- $tls := $v.redis.tls -}}
{{- if $tls.caKey -}}
{{- $files = append $files (dict "name" . "key" $tls.caKey "path" "redis/tls/ca.crt" "env" "CRM_EVENTS_REDIS_TLS_CA_FILE") -}}
{{- end -}}
{{- if $tls.certKey -}}
{{- $files = append $files (dict "name" . "key" $tls.certKey "path" "redis/tls/tls.crt" "env" "CRM_EVENTS_REDIS_TLS_CERT_FILE") -}}
{{- end -}}
{{- if $tls.keyKey -}}
{{- $files = append $files (dict "name" . "key" $tls.keyKey "path" "redis/tls/tls.key" "env" "CRM_EVENTS_REDIS_TLS_KEY_FILE") -}}
{{- end -}}
{{- end -}}
{{- if eq .component "ingest" -}}
{{- $sasl := $v.kafka.sasl -}}
{{- if or $sasl.password $sasl.existingSecret -}}
{{- $ref := include "crm-events.secretRef" (dict "root" $root "existing" $sasl.existingSecret "existingKey" $sasl.existingSecretKey "inlineKey" "kafka-sasl-password") | fromJson -}}
{{- $files = append $files (merge (dict "path" "kafka/sasl-password" "env" "CRM_EVENTS_KAFKA_SASL_PASSWORD_FILE") $ref) -}}
{{- end -}}
{{- with $v.kafka.tls.existingSecret -}}
{{- $tls := $v.kafka.tls -}}
{{- if $tls.caKey -}}
{{- $files = append $files (dict "name" . "key" $tls.caKey "path" "kafka/tls/ca.crt" "env" "CRM_EVENTS_KAFKA_SSL_CA_FILE") -}}
{{- end -}}
{{- if $tls.certKey -}}
{{- $files = append $files (dict "name" . "key" $tls.certKey "path" "kafka/tls/tls.crt" "env" "CRM_EVENTS_KAFKA_SSL_CERT_FILE") -}}
{{- end -}}
{{- if $tls.keyKey -}}
{{- $files = append $files (dict "name" . "key" $tls.keyKey "path" "kafka/tls/tls.key" "env" "CRM_EVENTS_KAFKA_SSL_KEY_FILE") -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson $files -}}
{{- end -}}

{{/* env entries naming the secret files, and the settings both components share. */}}
{{- define "crm-events.commonEnv" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
- name: CRM_EVENTS_REDIS_URL
  value: {{ $v.redis.url | quote }}
- name: CRM_EVENTS_REDIS_PREFIX
  value: {{ $v.redis.prefix | quote }}
{{- with $v.redis.sentinel.username }}
- name: CRM_EVENTS_REDIS_SENTINEL_USERNAME
  value: {{ . | quote }}
{{- end }}
{{- range (include "crm-events.secretFiles" . | fromJsonArray) }}
- name: {{ .env }}
  value: {{ printf "%s/%s" (include "crm-events.secretsDir" $root) .path | quote }}
{{- end }}
{{- end -}}

{{/* The pod's volumes: /tmp, and the secret files projected into one directory. */}}
{{- define "crm-events.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 16Mi
{{- $files := include "crm-events.secretFiles" . | fromJsonArray }}
{{- if $files }}
- name: secrets
  projected:
    # Readable by the pod's fsGroup only.
    defaultMode: 0440
    sources:
      {{- range $files }}
      - secret:
          name: {{ .name }}
          items:
            - key: {{ .key }}
              path: {{ .path }}
      {{- end }}
{{- end }}
{{- end -}}

{{- define "crm-events.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if (include "crm-events.secretFiles" . | fromJsonArray) }}
- name: secrets
  mountPath: {{ include "crm-events.secretsDir" .root }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* topologySpreadConstraints from a list of {topologyKey, maxSkew, whenUnsatisfiable}. */}}
{{- define "crm-events.topologySpread" -}}
{{- $root := .root -}}
{{- $component := .component -}}
{{- range .constraints }}
- topologyKey: {{ .topologyKey }}
  maxSkew: {{ .maxSkew }}
  whenUnsatisfiable: {{ .whenUnsatisfiable }}
  labelSelector:
    matchLabels:
      {{- include "crm-events.componentSelectorLabels" (dict "root" $root "component" $component) | nindent 6 }}
  matchLabelKeys:
    - pod-template-hash
{{- end }}
{{- end -}}

{{/* A checksum of the chart's Secret: the processes read their secrets once at start, so a
changed secret must restart the pods. It sits in the pod template, which more people may read
than the Secret: salted with the namespace and release, so that it matches no precomputed
table and no other release's hash of the same password. A salt in plain sight does not stop a
targeted guess at a weak password: give generated ones (or existingSecret, which is not
hashed at all). */}}
{{- define "crm-events.secretChecksum" -}}
{{- printf "crm-events/checksum/%s/%s/%s" .Release.Namespace .Release.Name (include "crm-events.inlineSecrets" .) | sha256sum -}}
{{- end -}}

{{/* A value of edge.env or ingest.env as its exact text. Helm reads every number of a values
file as a float64, and printing one gives 6.7108864e+07 for 67108864, which the processes
refuse as an integer; JSON prints floats without an exponent below 1e21. */}}
{{- define "crm-events.envValue" -}}
{{- if kindIs "string" . -}}
{{- . -}}
{{- else -}}
{{- toJson . -}}
{{- end -}}
{{- end -}}

{{/* The extra environment of one component, refused by the schema where the chart sets the
name itself. Argument: the env map. */}}
{{- define "crm-events.extraEnv" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ include "crm-events.envValue" $value | quote }}
{{- end }}
{{- end -}}

{{/* spec.replicas of a Deployment that an autoscaler (HPA or KEDA) scales: the count the live
Deployment has now. Leaving replicas out is not enough: on the upgrade that turns the
autoscaler on, Helm's three-way merge removes the field the previous release set, and the API
server defaults it to 1, so all but one pod go at once (for the edges, their clients all
reconnect) until the autoscaler reacts. Keeping the live count makes that patch a no-op.
lookup finds nothing under helm template or a first install: then the autoscaler's minimum.
Arguments: (dict "root" $ "name" <Deployment> "fallback" <minimum>). */}}
{{- define "crm-events.liveReplicas" -}}
{{- $live := lookup "apps/v1" "Deployment" .root.Release.Namespace .name -}}
{{- int (dig "spec" "replicas" .fallback $live) -}}
{{- end -}}

{{/* The edge's shutdown budget: preStop + drain + 10 s, unless set (validated). */}}
{{- define "crm-events.edgeTerminationGrace" -}}
{{- $e := .Values.edge -}}
{{- if kindIs "invalid" $e.terminationGracePeriodSeconds -}}
{{- add (int $e.preStopSleepSeconds) (int (ceil $e.shutdownGraceSeconds)) 10 -}}
{{- else -}}
{{- int $e.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}
