#!/bin/sh
# Writes the handwritten seeds of the fuzz targets into tests/fuzz/corpus/ (README.md): valid and
# near-valid requests in protobuf text format, encoded with protoc as a client would send them.
# Run from the top of the tree after changing a request message or the method order; the committed
# corpus is these seeds plus the minimised inputs the fuzzers found (`-merge=1`).
set -eu
cd "$(dirname "$0")/../.."
PROTO_PATH="-Iproto -I/usr/include"
FILES=$(find proto/iot -name '*.proto' | sort)

# The text as it is (dash's echo would read its backslashes).
txt() { printf '%s\n' "$*"; }

# seed FILE TYPE [PREFIX_BYTES_OCTAL] < text: FILE gets PREFIX then the encoded message.
seed() {
    out=$1 type=$2 prefix=${3:-}
    mkdir -p "$(dirname "$out")"
    { [ -z "$prefix" ] || printf "$prefix"; protoc $PROTO_PATH --encode="$type" $FILES; } >"$out"
}

# ---- proto: one byte choosing the method (fuzz_proto.c lists the order), then the request.
P=tests/fuzz/corpus/proto
D=iot.device.v1 I=iot.ingest.v1 O=iot.ota.v1 R=iot.processing.v1 G=iot.registry.v1
txt 'device { id: "dev-1" name: "Boiler 1" type: "thermostat" model: "TX-200" location { site: "plant-3/line-2" latitude: 48.1 longitude: 11.5 } labels { key: "env" value: "prod" } metadata { key: "owner" value: "ops" } firmware_version: "1.2.3" status: DEVICE_STATUS_PROVISIONED }' | seed $P/CreateDevice $D.CreateDeviceRequest '\000'
txt 'devices { id: "a" } devices { id: "b" name: "\303\251t\303\251" labels { key: "k8s.io/zone" value: "a" } }' | seed $P/BatchCreateDevices $D.BatchCreateDevicesRequest '\001'
txt 'id: "dev-1"' | seed $P/GetDevice $D.GetDeviceRequest '\002'
txt 'filter { type: "thermostat" statuses: DEVICE_STATUS_ONLINE label_selector: "env=prod,zone in (a,b),!legacy" name_contains: "50%_" search: "x" } page_size: 50 page_token: ""' | seed $P/ListDevices $D.ListDevicesRequest '\003'
txt 'filter { group_id: "g1" site_prefix: "plant" }' | seed $P/CountDevices $D.CountDevicesRequest '\004'
txt 'device { id: "dev-1" name: "n" etag: "3" } update_mask { paths: "name" paths: "labels" }' | seed $P/UpdateDevice $D.UpdateDeviceRequest '\005'
txt 'id: "dev-1" etag: "7"' | seed $P/DeleteDevice $D.DeleteDeviceRequest '\006'
txt 'group { id: "g1" description: "dyn" kind: GROUP_KIND_DYNAMIC filter { label_selector: "env notin (dev)" } }' | seed $P/CreateGroup $D.CreateGroupRequest '\007'
txt 'id: "g1"' | seed $P/GetGroup $D.GetGroupRequest '\010'
txt 'page_size: 1000' | seed $P/ListGroups $D.ListGroupsRequest '\011'
txt 'group { id: "g1" description: "d" filter { type: "x" } } update_mask { paths: "filter" }' | seed $P/UpdateGroup $D.UpdateGroupRequest '\012'
txt 'id: "g1"' | seed $P/DeleteGroup $D.DeleteGroupRequest '\013'
txt 'group_id: "g1" device_ids: "a" device_ids: "b"' | seed $P/AddGroupMembers $D.GroupMembersRequest '\014'
txt 'group_id: "g1" device_ids: "a"' | seed $P/RemoveGroupMembers $D.GroupMembersRequest '\015'
txt 'group_id: "g1" page_size: 10' | seed $P/ListGroupMembers $D.ListGroupMembersRequest '\016'
txt 'device_id: "dev-1" ttl_seconds: 3600' | seed $P/IssueToken $D.IssueTokenRequest '\017'
txt 'token_id: "t1" ttl_seconds: 60' | seed $P/RotateToken $D.RotateTokenRequest '\020'
txt 'token_id: "t1"' | seed $P/RevokeToken $D.RevokeTokenRequest '\021'
txt 'token: "dt_abc"' | seed $P/AuthenticateDevice $D.AuthenticateDeviceRequest '\022'
txt 'device_id: "dev-1" csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n" validity_days: 30' | seed $P/SignCertificate $D.SignCertificateRequest '\023'
txt 'serial: "0a1b2c" reason: 1' | seed $P/RevokeCertificate $D.RevokeCertificateRequest '\024'
txt '' | seed $P/GetRevocationList $D.GetRevocationListRequest '\025'
txt 'sightings { device_id: "a" } sightings { device_id: "b" time { seconds: 1767225600 nanos: 500 } }' | seed $P/ReportSeen $D.ReportSeenRequest '\026'
txt 'device_id: "dev-1"' | seed $P/GetShadow $D.GetShadowRequest '\027'
txt 'device_id: "dev-1" patch { fields { key: "mode" value { string_value: "eco" } } fields { key: "t" value { struct_value { fields { key: "x" value { number_value: 1.5 } } } } } fields { key: "old" value { null_value: NULL_VALUE } } } expected_version: 4' | seed $P/UpdateDesired $D.UpdateShadowRequest '\030'
txt 'device_id: "dev-1" patch { fields { key: "l" value { list_value { values { bool_value: true } } } } }' | seed $P/ReportState $D.UpdateShadowRequest '\031'
txt 'device_id: "dev-1" name: "reboot" payload { fields { key: "delay" value { number_value: 5 } } } ttl_seconds: 60 request_id: "r-1"' | seed $P/SendCommand $D.SendCommandRequest '\032'
txt 'id: "12"' | seed $P/GetCommand $D.GetCommandRequest '\033'
txt 'device_id: "dev-1" statuses: COMMAND_STATUS_PENDING statuses: COMMAND_STATUS_FAILED page_size: 5' | seed $P/ListCommands $D.ListCommandsRequest '\034'
txt 'device_id: "dev-1"' | seed $P/WatchCommands $D.WatchCommandsRequest '\035'
txt 'device_id: "dev-1" command_id: "12" success: false error: "busy"' | seed $P/AckCommand $D.AckCommandRequest '\036'
POINTS='points { seq: 1 metric: "temp" time_ms: 1767225000000 double_value: 21.5 labels { key: "unit" value: "C" } } points { seq: 2 metric: "on" time_ms: 1767225000001 bool_value: true } points { seq: 3 metric: "count" time_ms: 1767225000002 int_value: -7 } points { seq: 4 metric: "state/x" time_ms: 1767225000003 string_value: "ok \303\251" }'
txt "$POINTS" | seed $P/PushTelemetry $I.PushTelemetryRequest '\037'
txt "$POINTS" | seed $P/StreamTelemetry $I.StreamTelemetryRequest '\040'
txt 'device_id: "dev-1" metric: "temp" from_ms: 0 to_ms: 1767225600000 step_ms: 3600000 aggregation: AGGREGATION_AVG' | seed $P/QueryTelemetry $I.QueryTelemetryRequest '\041'
txt 'device_id: "dev-1" metric: "temp" from_ms: -5 to_ms: 9223372036854775807 page_size: 10 page_token: "01000000000000000000000000000000000000000000000000"' | seed $P/QueryTelemetry-raw $I.QueryTelemetryRequest '\041'
txt 'device_id: "dev-1"' | seed $P/LatestValues $I.LatestValuesRequest '\042'
txt 'device_id: "dev-1" metrics: "temp" metrics: "on"' | seed $P/WatchTelemetry $I.WatchTelemetryRequest '\043'
HEADER='name: "fw" version: "1.2.3-rc.1+build.5" models: "TX-200" release_notes: "notes" metadata { key: "k" value: "v" } sha256: "ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789" size: 10'
txt "header { $HEADER }" | seed $P/UploadArtifact $O.UploadArtifactRequest '\044'
txt 'id: "7"' | seed $P/GetArtifact $O.GetArtifactRequest '\045'
txt 'name: "fw" model: "TX-200" page_size: 10 page_token: "613a37"' | seed $P/ListArtifacts $O.ListArtifactsRequest '\046'
txt 'id: "7"' | seed $P/DeleteArtifact $O.DeleteArtifactRequest '\047'
txt '' | seed $P/ListSigningKeys $O.ListSigningKeysRequest '\050'
txt 'rollout { name: "r" artifact_id: "7" target { group_id: "g1" model: "TX-200" label_selector: "env=prod" version_range: ">=1.0.0 <2.0.0 !=1.1.0" } stages { percent: 10 success_threshold: 0.9 soak_ms: 60000 manual_approval: true } stages { count: 50 } stages { percent: 100 } gate { enabled: true max_ratio: 0.5 min_alerts: 2 min_severity: 3 } allow_downgrade: true }' | seed $P/CreateRollout $O.CreateRolloutRequest '\051'
txt 'id: "3"' | seed $P/GetRollout $O.GetRolloutRequest '\052'
txt 'artifact_id: "7" state: ROLLOUT_STATE_RUNNING page_size: 20' | seed $P/ListRollouts $O.ListRolloutsRequest '\053'
txt 'id: "3"' | seed $P/StartRollout $O.RolloutActionRequest '\054'
txt 'id: "3" reason: "errors"' | seed $P/PauseRollout $O.RolloutActionRequest '\055'
txt 'id: "3"' | seed $P/ResumeRollout $O.RolloutActionRequest '\056'
txt 'id: "3" reason: "done"' | seed $P/CancelRollout $O.RolloutActionRequest '\057'
txt 'id: "3" stage: 1' | seed $P/ApproveStage $O.ApproveStageRequest '\060'
txt 'rollout_id: "3" phase: UPDATE_PHASE_FAILED page_size: 100' | seed $P/ListDeviceUpdates $O.ListDeviceUpdatesRequest '\061'
txt 'current_version: "1.0.0" model: "TX-200"' | seed $P/CheckForUpdate $O.CheckForUpdateRequest '\062'
txt 'artifact_id: "7" offset: 4096' | seed $P/DownloadArtifact $O.DownloadArtifactRequest '\063'
txt 'rollout_id: "3" phase: UPDATE_PHASE_INSTALLING progress: 50' | seed $P/ReportStatus $O.ReportStatusRequest '\064'
RULE='id: "hot" name: "too hot" enabled: true devices { device_ids: "dev-1" type: "thermostat" label_selector: "env=prod" } metric: "temp" threshold { op: COMPARISON_GT threshold: 30 for_ms: 60000 statistic: STATISTIC_MEAN window { kind: WINDOW_KIND_TUMBLING width_ms: 60000 min_samples: 3 } } severity: SEVERITY_WARNING command { name: "cool" min_severity: SEVERITY_WARNING } webhook { url: "https://example.com/hook" max_attempts: 3 timeout_ms: 2000 }'
txt "rule { $RULE }" | seed $P/CreateRule $R.CreateRuleRequest '\065'
txt 'rule { id: "z" metric: "v" detector { kind: DETECTOR_KIND_ZSCORE level: 3 window_ms: 600000 min_samples: 10 } severity: SEVERITY_CRITICAL }' | seed $P/CreateRule-zscore $R.CreateRuleRequest '\065'
txt 'id: "hot"' | seed $P/GetRule $R.GetRuleRequest '\066'
txt 'page_size: 10 enabled_only: true' | seed $P/ListRules $R.ListRulesRequest '\067'
txt "rule { $RULE } update_mask { paths: \"threshold\" paths: \"enabled\" }" | seed $P/UpdateRule $R.UpdateRuleRequest '\070'
txt 'id: "hot" etag: "5"' | seed $P/DeleteRule $R.DeleteRuleRequest '\071'
txt 'id: "hot" enabled: true' | seed $P/SetRuleEnabled $R.SetRuleEnabledRequest '\072'
txt 'rule_id: "hot"' | seed $P/GetRuleStats $R.GetRuleStatsRequest '\073'
txt 'page_size: 10 state: ALERT_STATE_FIRING min_severity: SEVERITY_WARNING rule_id: "hot" device_id: "dev-1" fired_after { seconds: 1767225600 }' | seed $P/ListAlerts $R.ListAlertsRequest '\074'
txt 'id: "42"' | seed $P/GetAlert $R.GetAlertRequest '\075'
txt 'id: "42" by: "alice"' | seed $P/AckAlert $R.AckAlertRequest '\076'
txt 'min_severity: SEVERITY_INFO after_event_id: "100"' | seed $P/WatchAlerts $R.WatchAlertsRequest '\077'
txt 'rule_id: "hot" device_id: "dev-1"' | seed $P/GetWindowStats $R.GetWindowStatsRequest '\100'
txt 'device_id: "dev-1" metric: "temp" resolution_ms: 3600000 from { seconds: 1767225600 } to { seconds: 1767312000 nanos: 1 } page_size: 100' | seed $P/QueryRollups $R.QueryRollupsRequest '\101'
txt 'instance { service: "ingest" instance_id: "ingest-1" address: "10.0.0.7" port: 7003 version: "1.0" zone: "a" cluster: "c1" weight: 10 metadata { key: "k" value: "v" } check { kind: HTTP target: "/healthz" interval_ms: 1000 timeout_ms: 500 failures_before_critical: 2 successes_before_passing: 1 } } ttl_seconds: 30' | seed $P/RegisterInstance $G.RegisterRequest '\102'
txt 'lease_id: "0123456789abcdef0123456789abcdef"' | seed $P/Heartbeat $G.HeartbeatRequest '\103'
txt 'service: "ingest" instance_id: "ingest-1"' | seed $P/DeregisterInstance $G.DeregisterRequest '\104'
txt 'service: "ingest" only_passing: true prefer_zone: "a" prefer_cluster: "c1"' | seed $P/Discover $G.DiscoverRequest '\105'
txt '' | seed $P/ListServices $G.ListServicesRequest '\106'
txt 'service: "ingest"' | seed $P/Watch $G.WatchRequest '\107'

# ---- batch: a length byte and a device id, then a PushTelemetryRequest.
txt "$POINTS" | seed tests/fuzz/corpus/batch/points $I.PushTelemetryRequest '\005dev-1'
txt 'points { seq: 9 metric: "m" time_ms: 1767225600000 string_value: "x" labels { key: "a" value: "\"q\"" } labels { key: "b" value: "\001" } }' \
    | seed tests/fuzz/corpus/batch/labels $I.PushTelemetryRequest '\001d'

# ---- upload: chunk size byte, maximum byte, then frames (fuzz_upload.c). A header with a
# declared size of 10, two chunks (4 + 6 bytes), an empty message, the half-close.
txt "header { name: \"fw\" version: \"1.0.0\" models: \"m\" size: 10 }" | protoc $PROTO_PATH --encode=$O.UploadArtifactRequest $FILES >/tmp/fz_hdr.$$
len=$(wc -c </tmp/fz_hdr.$$)
mkdir -p tests/fuzz/corpus/upload
{ printf '\003\377\000'; printf "\\$(printf '%03o' $((len / 256)))\\$(printf '%03o' $((len % 256)))"; cat /tmp/fz_hdr.$$;
  printf '\001\004abcd\001\006efghij\002\003'; } >tests/fuzz/corpus/upload/header-chunks
rm -f /tmp/fz_hdr.$$
txt "header { name: \"fw\" version: \"2.0.0-beta\" models: \"m\" sha256: \"$(printf 'hello' | sha256sum | cut -c1-64)\" }" \
    | protoc $PROTO_PATH --encode=$O.UploadArtifactRequest $FILES >/tmp/fz_hdr.$$
len=$(wc -c </tmp/fz_hdr.$$)
{ printf '\000\377\000'; printf "\\$(printf '%03o' $((len / 256)))\\$(printf '%03o' $((len % 256)))"; cat /tmp/fz_hdr.$$;
  printf '\001\005hello'; } >tests/fuzz/corpus/upload/header-sha
rm -f /tmp/fz_hdr.$$
