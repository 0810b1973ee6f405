/* SPDX-License-Identifier: MIT */
/*
 * The record channel: a development and test sink that appends every
 * delivery it is given to a file, one JSON object per line, and reports
 * it sent. It lets a developer watch events flow, and lets tests count
 * deliveries, without any provider. It is not for production.
 */
#ifndef FO_RECORD_H
#define FO_RECORD_H

#include "fanout/channel.h"

/*
 * Opens (creating, appending) `path` and returns a channel that writes to
 * it. Returns FO_OK and sets *out, or FO_EIO / FO_ENOMEM. The caller
 * frees it with out->ops->destroy(out->self) after shutdown, which also
 * frees *out.
 */
int fo_record_new(const char *path, fo_channel **out);

#endif /* FO_RECORD_H */
