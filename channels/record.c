/* SPDX-License-Identifier: MIT */
/*
 * Record channel. Each line is written with a single write(2) on a file
 * opened with O_APPEND, so lines from several threads (or from a fanoutd
 * that is killed and restarted) never mix. Known limitation: a write cut
 * short by a full disk leaves a partial line, and the retry appends the
 * whole line after it.
 */
#include "record.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "fanout/common.h"
#include "log.h"

typedef struct record {
  fo_channel ch;
  int fd;
  atomic_uint_fast64_t seq;
  atomic_bool closed;
} record;

/* Writes one line; on FO_EIO, *err holds the errno of the write. */
static int write_line(record *r, const fo_delivery *d, uint64_t seq,
                      int *err) {
  const fo_event *ev = d->event;
  json_t *o;
  char *line;
  size_t n;
  ssize_t w;
  int rc = FO_OK;

  o = json_pack("{s:I, s:s, s:s, s:s, s:s, s:s, s:i, s:I}", "ts",
                (json_int_t)fo_wall_ms(), "event", ev->id, "user", d->user,
                "channel", fo_channel_name(d->channel), "category",
                ev->category, "priority", fo_priority_name(ev->priority),
                "attempt", (int)d->attempt, "seq", (json_int_t)seq);
  if (o == NULL)
    return FO_ENOMEM;
  if (ev->title != NULL)
    json_object_set_new(o, "title", json_string(ev->title));
  line = json_dumps(o, JSON_COMPACT);
  json_decref(o);
  if (line == NULL)
    return FO_ENOMEM;

  n = strlen(line);
  line[n] = '\n';
  do {
    w = write(r->fd, line, n + 1);
  } while (w < 0 && errno == EINTR);
  if (w != (ssize_t)(n + 1)) {
    *err = w < 0 ? errno : ENOSPC;
    rc = FO_EIO;
  }
  free(line);
  return rc;
}

static int record_submit(void *self, fo_delivery *d) {
  record *r = self;
  uint64_t seq;
  fo_outcome o;
  int rc, err = 0;

  if (atomic_load(&r->closed))
    return FO_ECLOSED;
  seq = atomic_fetch_add(&r->seq, 1) + 1;
  rc = write_line(r, d, seq, &err);

  if (rc == FO_OK) {
    fo_outcome_init(&o, FO_STATUS_SENT);
    snprintf(o.provider_id, sizeof(o.provider_id), "record-%d-%llu",
             (int)getpid(), (unsigned long long)seq);
  } else {
    static fo_ratelimit rl;

    /* A full disk may clear; let the engine retry with backoff. */
    fo_log_rl(&rl, 10000, FO_LOG_ERROR, "record", "write failed",
              "error=\"%s\"", rc == FO_EIO ? strerror(err)
                                             : fo_strerror(rc));
    fo_outcome_init(&o, FO_STATUS_FAILED);
    o.retryable = true;
    snprintf(o.reason, sizeof(o.reason), "write: %s", fo_strerror(rc));
  }
  fo_delivery_complete(d, &o);
  return FO_OK;
}

static int record_flush(void *self, int timeout_ms) {
  (void)self;
  (void)timeout_ms;
  /* Every delivery completes inside submit(); nothing is pending. */
  return FO_OK;
}

static void record_shutdown(void *self) {
  record *r = self;

  atomic_store(&r->closed, true);
}

static void record_destroy(void *self) {
  record *r = self;

  if (r->fd >= 0)
    close(r->fd);
  free(r);
}

static const fo_channel_ops record_ops = {
    .name = "record",
    .submit = record_submit,
    .flush = record_flush,
    .shutdown = record_shutdown,
    .destroy = record_destroy,
};

int fo_record_new(const char *path, fo_channel **out) {
  record *r = calloc(1, sizeof(*r));

  if (r == NULL)
    return FO_ENOMEM;
  r->fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (r->fd < 0) {
    free(r);
    return FO_EIO;
  }
  r->ch.ops = &record_ops;
  r->ch.self = r;
  *out = &r->ch;
  return FO_OK;
}
