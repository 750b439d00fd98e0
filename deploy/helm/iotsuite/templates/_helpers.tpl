{{/* Name prefix of every object. */}}
{{- define "iotsuite.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* Object name of one service: <fullname>-<service>. Call with (list $ "<service>"). */}}
{{- define "iotsuite.svcName" -}}
{{- printf "%s-%s" (include "iotsuite.fullname" (index . 0)) (index . 1) -}}
{{- end -}}

{{- define "iotsuite.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" -}}
{{- end -}}

{{/* Standard labels of every object; call with (list $ "<component>"). */}}
{{- define "iotsuite.labels" -}}
{{- $ := index . 0 -}}
helm.sh/chart: {{ include "iotsuite.chart" $ }}
app.kubernetes.io/name: {{ index . 1 }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/version: {{ $.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: iotsuite
app.kubernetes.io/managed-by: {{ $.Release.Service }}
{{- end -}}

{{/* Selector labels; call with (list $ "<component>"). */}}
{{- define "iotsuite.selectorLabels" -}}
app.kubernetes.io/name: {{ index . 1 }}
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
{{- end -}}

{{/* Image of a service; call with (list $ "<service>" $svcValues). */}}
{{- define "iotsuite.image" -}}
{{- $ := index . 0 -}}
{{- $s := index . 2 -}}
{{- $repo := default (printf "%s/%s" $.Values.image.repository (index . 1)) $s.image.repository -}}
{{- $tag := default (default $.Chart.AppVersion $.Values.image.tag) $s.image.tag -}}
{{- if $.Values.image.registry -}}
{{- printf "%s/%s:%s" $.Values.image.registry $repo $tag -}}
{{- else -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}
{{- end -}}

{{/* Which services use Postgres and Redis (the binaries' --help: IOT_PG_DSN, IOT_REDIS_ADDR). */}}
{{- define "iotsuite.usesPostgres" -}}
{{- if has . (list "device-mgmt" "ingest" "processing" "ota" "gateway") }}true{{ end -}}
{{- end -}}
{{- define "iotsuite.usesRedis" -}}
{{- if has . (list "registry" "device-mgmt" "ingest" "processing") }}true{{ end -}}
{{- end -}}

{{/* The services each one calls: env name -> callee (the *_ADDR variables of --help). */}}
{{- define "iotsuite.callees" -}}
ingest:
  IOT_INGEST_DM_ADDR: device-mgmt
processing:
  IOT_PROC_DM_ADDR: device-mgmt
ota:
  IOT_OTA_DM_ADDR: device-mgmt
  IOT_OTA_PROC_ADDR: processing
gateway:
  IOT_GW_DM_ADDR: device-mgmt
  IOT_GW_INGEST_ADDR: ingest
  IOT_GW_PROC_ADDR: processing
  IOT_GW_OTA_ADDR: ota
  IOT_GW_REGISTRY_ADDR: registry
{{- end -}}

{{/* Secret holding IOT_PG_DSN and its key. */}}
{{- define "iotsuite.dbSecretName" -}}
{{- if and (not .Values.postgresql.enabled) .Values.database.existingSecret -}}
{{- .Values.database.existingSecret -}}
{{- else -}}
{{- printf "%s-database" (include "iotsuite.fullname" .) -}}
{{- end -}}
{{- end -}}
{{- define "iotsuite.dbSecretKey" -}}
{{- if and (not .Values.postgresql.enabled) .Values.database.existingSecret -}}
{{- .Values.database.existingSecretKey -}}
{{- else -}}dsn{{- end -}}
{{- end -}}

{{/* Password of the bundled Postgres: the value, else the one already in the cluster, else new. */}}
{{- define "iotsuite.pgPassword" -}}
{{- if .Values.postgresql.password -}}
{{- .Values.postgresql.password -}}
{{- else -}}
{{- $old := lookup "v1" "Secret" .Release.Namespace (printf "%s-postgresql" (include "iotsuite.fullname" .)) -}}
{{- if and $old $old.data (index $old.data "password") -}}
{{- index $old.data "password" | b64dec -}}
{{- else -}}
{{- randAlphaNum 32 -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "iotsuite.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "iotsuite.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* gRPC API of each service for the Istio templates: package, device-facing methods (reached
     through the ingress), streaming methods (no mesh timeout), idempotent methods (retried). */}}
{{- define "iotsuite.grpcApi" -}}
registry:
  package: iot.registry.v1.Registry
  streams: Watch
  idempotent: Discover|ListServices
device-mgmt:
  package: iot.device.v1.DeviceManager
  device: [WatchCommands, AckCommand, ReportState, GetShadow]
  streams: WatchCommands
  idempotent: (Get|List|Count)[A-Za-z]*
ingest:
  package: iot.ingest.v1.Ingest
  device: [PushTelemetry, StreamTelemetry]
  streams: StreamTelemetry|WatchTelemetry
  idempotent: QueryTelemetry|LatestValues
processing:
  package: iot.processing.v1.Processing
  streams: WatchAlerts
  idempotent: (Get|List|Query)[A-Za-z]*
ota:
  package: iot.ota.v1.Ota
  device: [CheckForUpdate, DownloadArtifact, ReportStatus]
  streams: UploadArtifact|DownloadArtifact
  idempotent: (Get|List)[A-Za-z]*|CheckForUpdate
gateway:
  package: iot.gateway.v1.Gateway
{{- end -}}

{{- /* The canary split of a VirtualService route: (list $ host port); port 0 leaves the port to the
       request (in-mesh), the ingress names it because the Services have several ports. */}}
{{- define "iotsuite.canaryRoute" -}}
{{- $ctx := index . 0 }}
{{- $host := index . 1 }}
{{- $port := index . 2 }}
{{- range $sub := list "v1" "v2" }}
- destination:
    host: {{ $host }}
    subset: {{ $sub }}
    {{- if $port }}
    port: {number: {{ $port }}}
    {{- end }}
  weight: {{ int (get $ctx.Values.istio.canary (printf "%sWeight" $sub)) }}
{{- end }}
{{- end -}}
