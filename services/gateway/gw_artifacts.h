/* Artifact upload and download over HTTP (see gw_artifacts.c). */
#ifndef GW_ARTIFACTS_H
#define GW_ARTIFACTS_H

#include "gw.h"

/* POST /api/v1/artifacts: the begin hook (opens UploadArtifact, streams the body) and the answer. */
void gw_artifacts_upload_begin(gw_req_t *r);
void gw_artifacts_upload(gw_req_t *r);
/* GET /api/v1/artifacts/{artifact_id}/content: DownloadArtifact as the body (device token). */
void gw_artifacts_download(gw_req_t *r);

#endif
