/* SPDX-License-Identifier: MIT */
/*
 * The embedded development broker, on librdkafka's mock cluster API.
 */
#include "kafka_mock.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include "fanout/common.h"
#include "log.h"

struct fo_kmock {
  rd_kafka_t *rk;               /* the handle the cluster lives in */
  rd_kafka_mock_cluster_t *mc;
  char *bootstraps;
};

static void mock_log_cb(const rd_kafka_t *rk, int level, const char *fac,
                        const char *buf) {
  (void)rk;
  /* The mock broker reports every client disconnect; only errors matter
   * to an operator. */
  if (level <= 3)
    fo_log_error("kafka-mock", "librdkafka", "fac=%s detail=\"%s\"", fac,
                 buf);
  else
    fo_log_debug("kafka-mock", "librdkafka", "fac=%s detail=\"%s\"", fac,
                 buf);
}

int fo_kmock_start(const char *const *topics, int partitions,
                   fo_kmock **out, char *err, size_t errlen) {
  rd_kafka_conf_t *conf = rd_kafka_conf_new();
  fo_kmock *m = calloc(1, sizeof(*m));
  char why[512];

  if (m == NULL) {
    rd_kafka_conf_destroy(conf);
    snprintf(err, errlen, "kafka: out of memory");
    return FO_ENOMEM;
  }
  rd_kafka_conf_set_log_cb(conf, mock_log_cb);
  m->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, why, sizeof(why));
  if (m->rk == NULL) {
    rd_kafka_conf_destroy(conf);
    snprintf(err, errlen, "kafka: embedded broker: %s", why);
    goto fail;
  }
  m->mc = rd_kafka_mock_cluster_new(m->rk, 1);
  if (m->mc == NULL) {
    snprintf(err, errlen, "kafka: embedded broker: cannot start");
    goto fail;
  }

  for (size_t i = 0; topics[i] != NULL; i++) {
    rd_kafka_resp_err_t e =
        rd_kafka_mock_topic_create(m->mc, topics[i], partitions, 1);

    if (e != RD_KAFKA_RESP_ERR_NO_ERROR) {
      snprintf(err, errlen, "kafka: embedded broker: topic %s: %s",
               topics[i], rd_kafka_err2str(e));
      goto fail;
    }
  }
  m->bootstraps = strdup(rd_kafka_mock_cluster_bootstraps(m->mc));
  if (m->bootstraps == NULL) {
    snprintf(err, errlen, "kafka: out of memory");
    goto fail;
  }
  *out = m;
  return FO_OK;

fail:
  fo_kmock_stop(m);
  return FO_EKAFKA;
}

const char *fo_kmock_bootstraps(const fo_kmock *m) {
  return m->bootstraps;
}

static int make_parent_dirs(const char *path) {
  char buf[4096];
  size_t n = strlen(path);

  if (n >= sizeof(buf))
    return FO_EINVAL;
  memcpy(buf, path, n + 1);
  for (char *p = buf + 1; *p != '\0'; p++) {
    if (*p != '/')
      continue;
    *p = '\0';
    if (mkdir(buf, 0755) != 0 && errno != EEXIST)
      return FO_EIO;
    *p = '/';
  }
  return FO_OK;
}

int fo_kmock_write_bootstrap(const fo_kmock *m, const char *path) {
  char tmp[4200];
  FILE *f;
  int rc;

  if ((rc = make_parent_dirs(path)) != FO_OK)
    return rc;
  snprintf(tmp, sizeof(tmp), "%s.%ld.tmp", path, (long)getpid());
  f = fopen(tmp, "w");
  if (f == NULL)
    return FO_EIO;
  if (fprintf(f, "%s\n", m->bootstraps) < 0) {
    fclose(f);
    unlink(tmp);
    return FO_EIO;
  }
  if (fclose(f) != 0 || rename(tmp, path) != 0) {
    unlink(tmp);
    return FO_EIO;
  }
  return FO_OK;
}

void fo_kmock_stop(fo_kmock *m) {
  if (m == NULL)
    return;
  if (m->mc != NULL)
    rd_kafka_mock_cluster_destroy(m->mc);
  if (m->rk != NULL)
    rd_kafka_destroy(m->rk);
  free(m->bootstraps);
  free(m);
}
