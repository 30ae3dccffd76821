{{/*
Names and labels.
*/}}
{{- define "gristmill.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-gristmill, or the release name alone when it already says gristmill. */}}
{{- define "gristmill.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "gristmill.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "gristmill.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gristmill
{{- end }}

{{/* Selector labels of one component: dict "root" $ "component" "<name>". */}}
{{- define "gristmill.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gristmill.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "gristmill.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gristmill.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The services, in start order, with what the chart needs to know of each: the prefix of its settings class, whether
it is a gRPC service (ServiceSettings) or the console (HTTP), and whether it reads the S3 settings (admin keeps no
objects, as in docker-compose.yml).
*/}}
{{- define "gristmill.serviceTable" -}}
admin: {prefix: GRISTMILL_ADMIN_, grpc: true, s3: false}
labeling: {prefix: GRISTMILL_LABELING_, grpc: true, s3: true}
training: {prefix: GRISTMILL_TRAINING_, grpc: true, s3: true}
registry: {prefix: GRISTMILL_REGISTRY_, grpc: true, s3: true}
serving: {prefix: GRISTMILL_SERVING_, grpc: true, s3: true}
console: {prefix: GRISTMILL_CONSOLE_, grpc: false, s3: false}
{{- end }}

{{- define "gristmill.serviceOrder" -}}
admin labeling training registry serving console
{{- end }}

{{/* A number as the service reads it: YAML numbers reach templates as float64, so 15000 would print 1.5e+04. */}}
{{- define "gristmill.scalar" -}}
{{- if kindIs "float64" . -}}
{{- if eq (float64 (int64 .)) . }}{{ int64 . | toString | quote }}{{ else }}{{ toString . | quote }}{{ end -}}
{{- else -}}
{{- toString . | quote -}}
{{- end -}}
{{- end }}

{{/* host:port of a service of this release: dict "root" $ "service" "<name>". */}}
{{- define "gristmill.address" -}}
{{- $svc := index .root.Values.services .service -}}
{{- printf "%s-%s:%s" (include "gristmill.fullname" .root) .service (include "gristmill.scalar" $svc.settings.grpc_port | trimAll "\"") -}}
{{- end }}

{{/*
Environment variables from a settings map: dict "prefix" "GRISTMILL_X_" "settings" <map> "computed" <map> "skip"
<keys left to Secrets> "override" <variable names that env: sets>. For each key: its value, or the computed one when
it is null; nothing when both are null.
*/}}
{{- define "gristmill.settingsEnv" -}}
{{- $computed := .computed | default dict -}}
{{- $skip := .skip | default list -}}
{{- $override := .override | default list -}}
{{- $keys := concat (keys .settings) (keys $computed) | uniq | sortAlpha -}}
{{- range $key := $keys }}
{{- $name := printf "%s%s" $.prefix (upper $key) -}}
{{- if not (or (has $key $skip) (has $name $override)) }}
{{- $value := index $.settings $key -}}
{{- if kindIs "invalid" $value }}{{ $value = index $computed $key }}{{ end -}}
{{- if not (kindIs "invalid" $value) }}
- name: {{ $name }}
  value: {{ include "gristmill.scalar" $value }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
An environment variable from a Secret: dict "root" $ "name" "<VARIABLE>" "item" <{value (a database's: url),
existingSecret, key}> "override" <names>. Nothing when the item has neither a value nor an existing Secret.
*/}}
{{- define "gristmill.secretEnv" -}}
{{- $item := .item -}}
{{- if and (or $item.existingSecret $item.value $item.url) (not (has .name (.override | default list))) }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ $item.existingSecret | default (printf "%s-secrets" (include "gristmill.fullname" .root)) }}
      key: {{ $item.key }}
{{- end }}
{{- end }}

{{/* The image of a service: dict "root" $ "image" <{repository, tag}> "service" "<name>". */}}
{{- define "gristmill.image" -}}
{{- $global := .root.Values.image -}}
{{- $repository := .image.repository | default (printf "%s/%s" $global.repository .service) -}}
{{- $tag := .image.tag | default $global.tag | default .root.Chart.AppVersion -}}
{{- if $global.registry }}{{ printf "%s/%s:%s" $global.registry $repository $tag }}{{ else }}{{ printf "%s:%s" $repository $tag }}{{ end -}}
{{- end }}

{{/* The TLS Secret's name. */}}
{{- define "gristmill.tlsSecret" -}}
{{- .Values.tls.existingSecret | default (printf "%s-tls" (include "gristmill.fullname" .)) -}}
{{- end }}

{{/* The licence Secret's name, or nothing without a licence. */}}
{{- define "gristmill.licenseSecret" -}}
{{- if .Values.license.existingSecret }}{{ .Values.license.existingSecret }}{{ else if .Values.license.content }}{{ printf "%s-license" (include "gristmill.fullname" .) }}{{ end -}}
{{- end }}

{{/*
The shared settings of a service's pod (Kafka, S3, telemetry, auth, licence, TLS): dict "root" $ "service" "<name>"
"override" <names>.
*/}}
{{- define "gristmill.sharedEnv" -}}
{{- $root := .root -}}
{{- $table := include "gristmill.serviceTable" $root | fromYaml -}}
{{- $meta := index $table .service -}}
{{- $override := .override -}}
{{- $fullname := include "gristmill.fullname" $root -}}
{{- if $meta.grpc }}
{{- include "gristmill.settingsEnv" (dict "prefix" "GRISTMILL_KAFKA_" "settings" $root.Values.kafka.settings "override" $override) }}
{{- if $meta.s3 }}
{{- include "gristmill.settingsEnv" (dict "prefix" "GRISTMILL_S3_" "settings" $root.Values.s3.settings "skip" (list "access_key" "secret_key") "override" $override) }}
{{- include "gristmill.secretEnv" (dict "root" $root "name" "GRISTMILL_S3_ACCESS_KEY" "item" $root.Values.secrets.s3AccessKey "override" $override) }}
{{- include "gristmill.secretEnv" (dict "root" $root "name" "GRISTMILL_S3_SECRET_KEY" "item" $root.Values.secrets.s3SecretKey "override" $override) }}
{{- end }}
{{- $auth := dict }}
{{- if ne .service "admin" }}{{ $_ := set $auth "admin_address" (include "gristmill.address" (dict "root" $root "service" "admin")) }}{{ end }}
{{- include "gristmill.settingsEnv" (dict "prefix" "GRISTMILL_AUTH_" "settings" $root.Values.auth.settings "computed" $auth "skip" (list "service_key") "override" $override) }}
{{- include "gristmill.secretEnv" (dict "root" $root "name" "GRISTMILL_AUTH_SERVICE_KEY" "item" $root.Values.secrets.serviceKey "override" $override) }}
{{- $license := dict }}
{{- if include "gristmill.licenseSecret" $root }}{{ $_ := set $license "file" (printf "/etc/gristmill/license/%s" $root.Values.license.key) }}{{ end }}
{{- include "gristmill.settingsEnv" (dict "prefix" "GRISTMILL_LICENSE_" "settings" $root.Values.license.settings "computed" $license "override" $override) }}
{{- end }}
{{- $tls := dict }}
{{- if $root.Values.tls.enabled }}
{{- $_ := set $tls "cert_file" (printf "/etc/gristmill/certs/%s.pem" .service) }}
{{- $_ := set $tls "key_file" (printf "/etc/gristmill/certs/%s.key" .service) }}
{{- $_ := set $tls "ca_file" "/etc/gristmill/certs/ca.pem" }}
{{- end }}
{{- include "gristmill.settingsEnv" (dict "prefix" "GRISTMILL_TLS_" "settings" $root.Values.tls.settings "computed" $tls "override" $override) }}
{{- $telemetry := dict "service_name" (printf "gristmill-%s" .service) }}
{{- if $root.Values.otelCollector.enabled }}{{ $_ := set $telemetry "exporter_otlp_endpoint" (printf "http://%s-otel-collector:4317" $fullname) }}{{ end }}
{{- include "gristmill.settingsEnv" (dict "prefix" "OTEL_" "settings" $root.Values.telemetry.settings "computed" $telemetry "override" $override) }}
{{- end }}

{{/* The environment of the RayCluster's head and workers: the S3 settings, no model hub, rayCluster.env. */}}
{{- define "gristmill.rayEnv" -}}
{{- include "gristmill.settingsEnv" (dict "prefix" "GRISTMILL_S3_" "settings" .Values.s3.settings "skip" (list "access_key" "secret_key")) }}
{{- include "gristmill.secretEnv" (dict "root" . "name" "GRISTMILL_S3_ACCESS_KEY" "item" .Values.secrets.s3AccessKey) }}
{{- include "gristmill.secretEnv" (dict "root" . "name" "GRISTMILL_S3_SECRET_KEY" "item" .Values.secrets.s3SecretKey) }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- range $key := keys .Values.rayCluster.env | sortAlpha }}
- name: {{ $key }}
  value: {{ include "gristmill.scalar" (index $.Values.rayCluster.env $key) }}
{{- end }}
{{- end }}
