/* SPDX-License-Identifier: MIT */
/*
 * fanoutd: the notification fan-out daemon. Loads the configuration,
 * starts the embedded development broker when asked to, wires the
 * pipeline and its channels, and runs until SIGTERM or SIGINT, after
 * which it drains in-flight work, commits what finished and exits 0.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "admin.h"
#include "config.h"
#include "engine.h"
#include "fanout/common.h"
#include "kafka_mock.h"
#include "log.h"
#include "publish.h"
#include "record.h"
#include "sendgrid.h"
#include "twilio.h"
#include "version.h"

static const char *const channel_providers[FO_CH_COUNT] = {
    "[apns] or [fcm]", "[sendgrid]", "[twilio]", "[relay]"};

static void usage(FILE *to) {
  fprintf(to,
          "usage: fanoutd [-c FILE]\n"
          "\n"
          "Runs the fanout notification daemon.\n"
          "\n"
          "  -c, --config FILE  INI configuration (see docs/config.md);\n"
          "                     every key can be overridden by the\n"
          "                     environment as FANOUT_<SECTION>_<KEY>\n"
          "  -h, --help         show this help\n"
          "  -V, --version      show the version\n");
}

static int parse_args(int argc, char **argv, const char **config) {
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];

    if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
      usage(stdout);
      exit(0);
    }
    if (strcmp(a, "-V") == 0 || strcmp(a, "--version") == 0) {
      printf("fanoutd %s\n", FO_VERSION);
      exit(0);
    }
    if ((strcmp(a, "-c") == 0 || strcmp(a, "--config") == 0) &&
        i + 1 < argc) {
      *config = argv[++i];
      continue;
    }
    fprintf(stderr, "fanoutd: unknown argument '%s'\n", a);
    usage(stderr);
    return FO_EINVAL;
  }
  return FO_OK;
}

/* Creates the e-mail channel when [sendgrid] is given. */
static int setup_sendgrid(const fo_config *cfg, fo_channel **out) {
  fo_sendgrid_conf c;
  char err[256];
  int rc;

  if (!fo_config_has_section(cfg, "sendgrid"))
    return FO_OK;
  memset(&c, 0, sizeof(c));
  c.url = fo_config_get(cfg, "sendgrid", "url");
  c.api_key = fo_config_get(cfg, "sendgrid", "api_key");
  c.from = fo_config_get(cfg, "sendgrid", "from");
  c.ca_file = fo_config_get(cfg, "sendgrid", "ca_file");
  c.max_inflight = (int)fo_config_get_int(cfg, "sendgrid", "max_inflight");
  c.timeout_ms = (int)fo_config_get_int(cfg, "sendgrid", "timeout_ms");
  rc = fo_sendgrid_new(&c, out, err, sizeof(err));
  if (rc != FO_OK) {
    fo_log_error("fanoutd", "cannot start the e-mail channel",
                 "error=\"%s\"", err);
    return rc;
  }
  fo_log_info("fanoutd", "channel sends through SendGrid",
              "channel=email url=%s", c.url);
  return FO_OK;
}

/* Creates the SMS channel when [twilio] is given, and routes SMS to it
 * (in place of the record sink). */
static int setup_twilio(const fo_config *cfg, fo_engine *e,
                        fo_channel **out) {
  fo_twilio_conf c;
  char err[256];
  int rc;

  if (!fo_config_has_section(cfg, "twilio"))
    return FO_OK;
  memset(&c, 0, sizeof(c));
  c.url = fo_config_get(cfg, "twilio", "url");
  c.account_sid = fo_config_get(cfg, "twilio", "account_sid");
  c.auth_token = fo_config_get(cfg, "twilio", "auth_token");
  c.from = fo_config_get(cfg, "twilio", "from");
  c.messaging_service_sid =
      fo_config_get(cfg, "twilio", "messaging_service_sid");
  c.ca_file = fo_config_get(cfg, "twilio", "ca_file");
  c.status_callback_url = fo_config_get(cfg, "twilio", "status_callback_url");
  c.max_inflight = (int)fo_config_get_int(cfg, "twilio", "max_inflight");
  c.timeout_ms = (int)fo_config_get_int(cfg, "twilio", "timeout_ms");
  c.rate_per_second =
      (int)fo_config_get_int(cfg, "twilio", "rate_per_second");
  c.store = fo_engine_store(e);
  c.limits = fo_engine_limits(e);
  rc = fo_twilio_new(&c, out, err, sizeof(err));
  if (rc != FO_OK) {
    fo_log_error("fanoutd", "cannot start the SMS channel", "error=\"%s\"",
                 err);
    return rc;
  }
  fo_engine_set_channel(e, FO_CH_SMS, *out);
  fo_log_info("fanoutd", "channel sends through Twilio", "channel=sms url=%s",
              c.url);
  return FO_OK;
}

/* Creates the channels the configuration turns on; logs the others off
 * once, at start. */
static int setup_channels(const fo_config *cfg, fo_engine *e,
                          fo_channel **record_out,
                          fo_channel **sendgrid_out) {
  const char *file = fo_config_get(cfg, "record", "file");
  const char *list = fo_config_get(cfg, "record", "channels");
  int rc;

  rc = setup_sendgrid(cfg, sendgrid_out);
  if (rc != FO_OK)
    return rc;
  if (*sendgrid_out != NULL)
    fo_engine_set_channel(e, FO_CH_EMAIL, *sendgrid_out);

  if (fo_config_has_section(cfg, "record") && file != NULL) {
    rc = fo_record_new(file, record_out);
    if (rc != FO_OK) {
      fo_log_error("fanoutd", "cannot open the record file",
                   "file=\"%s\" error=\"%s\"", file, strerror(errno));
      return rc;
    }
  }

  for (int k = 0; k < FO_CH_COUNT; k++) {
    const char *name = fo_channel_name((fo_channel_kind)k);
    bool recorded = false;

    if (k == FO_CH_EMAIL && *sendgrid_out != NULL)
      continue;
    if (k == FO_CH_SMS && fo_config_has_section(cfg, "twilio"))
      continue;
    if (*record_out != NULL && list != NULL) {
      char buf[128];

      snprintf(buf, sizeof(buf), "%s", list);
      for (char *save = NULL, *t = strtok_r(buf, ",", &save); t != NULL;
           t = strtok_r(NULL, ",", &save)) {
        while (*t == ' ')
          t++;
        if (strncmp(t, name, strlen(name)) == 0 &&
            (t[strlen(name)] == '\0' || t[strlen(name)] == ' '))
          recorded = true;
      }
    }
    if (recorded) {
      fo_engine_set_channel(e, (fo_channel_kind)k, *record_out);
      fo_log_info("fanoutd", "channel records to a file (development sink)",
                  "channel=%s file=\"%s\"", name, file);
    } else {
      fo_log_info("fanoutd", "channel off: no provider configured",
                  "channel=%s needs=\"%s\"", name, channel_providers[k]);
    }
  }
  return FO_OK;
}

static int start_embedded(const fo_config *cfg, fo_kmock **mock) {
  const char *topics[4];
  const char *file = fo_config_get(cfg, "kafka", "bootstrap_file");
  char err[512];
  int rc;

  topics[0] = fo_config_get(cfg, "kafka", "topic");
  topics[1] = fo_config_get(cfg, "kafka", "dlq_topic");
  topics[2] = fo_config_get(cfg, "kafka", "chat_topic");
  topics[3] = NULL;
  rc = fo_kmock_start(topics,
                      (int)fo_config_get_int(cfg, "kafka",
                                             "embedded_partitions"),
                      mock, err, sizeof(err));
  if (rc != FO_OK) {
    fo_log_error("fanoutd", "embedded kafka failed", "error=\"%s\"", err);
    return rc;
  }
  if (fo_kmock_write_bootstrap(*mock, file) != FO_OK) {
    fo_log_error("fanoutd", "cannot write the bootstrap file",
                 "file=\"%s\" error=\"%s\"", file, strerror(errno));
    return FO_EIO;
  }
  fo_log_info("fanoutd",
              "embedded kafka started (development only; production sets "
              "kafka.brokers)",
              "bootstrap=%s file=\"%s\"", fo_kmock_bootstraps(*mock), file);
  return FO_OK;
}

/* Starts the REST admin API, which needs the user store. */
static int start_admin(const fo_config *cfg, fo_engine *e,
                       const char *brokers, fo_publish **pub,
                       fo_admin **admin) {
  fo_admin_conf ac;
  char err[512];

  if (fo_engine_store(e) == NULL) {
    fo_log_warn("fanoutd", "admin API off: it needs [postgres] dsn", "");
    return FO_OK;
  }
  if (fo_publish_new(brokers, fo_config_get(cfg, "kafka", "topic"), pub, err,
                     sizeof(err)) != FO_OK) {
    fo_log_error("fanoutd", "cannot start the event publisher",
                 "error=\"%s\"", err);
    return FO_EKAFKA;
  }

  memset(&ac, 0, sizeof(ac));
  ac.listen = fo_config_get(cfg, "admin", "listen");
  ac.token = fo_config_get(cfg, "admin", "token");
  ac.store = fo_engine_store(e);
  ac.limits = fo_engine_limits(e);
  ac.publish = *pub;
  ac.max_event_bytes =
      (size_t)fo_config_get_int(cfg, "kafka", "max_event_bytes");
  if (fo_config_has_section(cfg, "twilio")) {
    ac.twilio_auth_token = fo_config_get(cfg, "twilio", "auth_token");
    ac.twilio_callback_url =
        fo_config_get(cfg, "twilio", "status_callback_url");
  }
  if (fo_admin_start(&ac, admin, err, sizeof(err)) != FO_OK) {
    fo_log_error("fanoutd", "cannot start the admin API",
                 "listen=%s error=\"%s\"", ac.listen, err);
    return FO_EIO;
  }
  fo_log_info("fanoutd", "admin API listening", "listen=%s", ac.listen);
  return FO_OK;
}

/* Waits for a stop signal, logging the summary on its interval. */
static int wait_for_signal(fo_engine *e, int64_t summary_s) {
  sigset_t set;

  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  for (;;) {
    struct timespec ts = {.tv_sec = summary_s > 0 ? summary_s : 3600};
    int sig = sigtimedwait(&set, NULL, &ts);

    if (sig == SIGTERM || sig == SIGINT)
      return sig;
    if (sig < 0 && errno == EAGAIN && summary_s > 0)
      fo_engine_log_summary(e);
  }
}

int main(int argc, char **argv) {
  const char *path = NULL;
  fo_config *cfg = NULL;
  fo_kmock *mock = NULL;
  fo_engine *e = NULL;
  fo_channel *record = NULL;
  fo_channel *sendgrid = NULL;
  fo_channel *twilio = NULL;
  fo_publish *pub = NULL;
  fo_admin *admin = NULL;
  fo_log_level level;
  sigset_t set;
  char err[512];
  const char *brokers;
  int rc, sig, exit_code = 1;

  if (parse_args(argc, argv, &path) != FO_OK)
    return 2;
  if (fo_config_load(path, NULL, &cfg, err, sizeof(err)) != FO_OK) {
    fprintf(stderr, "fanoutd: %s\n", err);
    return 1;
  }
  if (fo_log_level_parse(fo_config_get(cfg, "log", "level"), &level) ==
      FO_OK)
    fo_log_set_level(level);

  /* Signals are taken by the main thread only, with sigtimedwait, so
   * every thread started from here on must inherit this mask. */
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, NULL);
  signal(SIGPIPE, SIG_IGN);

  fo_log_info("fanoutd", "starting", "version=%s config=\"%s\"", FO_VERSION,
              path != NULL ? path : "(defaults)");
  brokers = fo_config_get(cfg, "kafka", "brokers");
  if (strcmp(brokers, "embedded") == 0) {
    if (start_embedded(cfg, &mock) != FO_OK)
      goto out;
    brokers = fo_kmock_bootstraps(mock);
  }

  /* PostgreSQL down at start is waited for, not a reason to exit: no
   * event has been read yet, so nothing is late but the start. */
  while ((rc = fo_engine_new(cfg, brokers, &e, err, sizeof(err))) ==
             FO_EIO &&
         fo_config_get(cfg, "postgres", "dsn") != NULL) {
    static fo_ratelimit rl;
    struct timespec ts = {.tv_sec = 2};

    fo_log_rl(&rl, 30000, FO_LOG_WARN, "fanoutd",
              "PostgreSQL unreachable, waiting for it before starting",
              "error=\"%s\"", err);
    sig = sigtimedwait(&set, NULL, &ts);
    if (sig == SIGTERM || sig == SIGINT) {
      fo_log_info("fanoutd", "stopped while waiting for PostgreSQL", "");
      exit_code = 0;
      goto out;
    }
  }
  if (rc != FO_OK) {
    fo_log_error("fanoutd", "cannot build the pipeline", "error=\"%s\"",
                 err);
    goto out;
  }
  if (setup_channels(cfg, e, &record, &sendgrid) != FO_OK)
    goto out;
  if (setup_twilio(cfg, e, &twilio) != FO_OK)
    goto out;
  if (fo_engine_start(e) != FO_OK)
    goto out;
  if (start_admin(cfg, e, brokers, &pub, &admin) != FO_OK)
    goto out;
  fo_log_info("fanoutd", "running", "brokers=%s group=%s topic=%s", brokers,
              fo_config_get(cfg, "kafka", "group"),
              fo_config_get(cfg, "kafka", "topic"));

  sig = wait_for_signal(e, fo_config_get_int(cfg, "engine",
                                             "summary_interval_s"));
  fo_log_info("fanoutd", "stopping: draining in-flight work", "signal=%s",
              sig == SIGTERM ? "TERM" : "INT");
  if (admin != NULL)
    fo_admin_stop(admin);
  admin = NULL;
  rc = fo_engine_stop(e, (int)fo_config_get_int(cfg, "engine",
                                                "drain_timeout_ms"));
  fo_engine_log_summary(e);
  if (rc == FO_OK)
    fo_log_info("fanoutd", "stopped: all work finished and committed",
                "%s", "");
  else
    fo_log_warn("fanoutd",
                "stopped before all work finished; the rest is replayed "
                "after restart", "%s", "");
  exit_code = 0;

out:
  if (admin != NULL)
    fo_admin_stop(admin);
  if (pub != NULL)
    fo_publish_free(pub);
  /* The engine's stop shut it down already, unless the start failed
   * before; it uses the engine's store, so it stops before that goes. */
  if (twilio != NULL)
    twilio->ops->shutdown(twilio->self);
  fo_engine_free(e);
  if (twilio != NULL)
    twilio->ops->destroy(twilio->self);
  if (record != NULL)
    record->ops->destroy(record->self);
  if (sendgrid != NULL) {
    /* Shut down already when the engine stopped; not when the start
     * failed before that. */
    sendgrid->ops->shutdown(sendgrid->self);
    sendgrid->ops->destroy(sendgrid->self);
  }
  fo_kmock_stop(mock);
  fo_config_free(cfg);
  return exit_code;
}
