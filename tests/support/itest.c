/* SPDX-License-Identifier: MIT */
/*
 * Integration test support: real processes, real Kafka protocol.
 */
#include "itest.h"

#include <errno.h>
#include <fcntl.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>

extern char **environ;

int64_t itest_now_ms(void) {
  struct timespec ts;

  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void itest_sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};

  nanosleep(&ts, NULL);
}

static const char *build_dir(void) {
  const char *b = getenv("FANOUT_TEST_BUILD");

  return b != NULL ? b : "build/test";
}

const char *itest_bin(const char *name) {
  static __thread char path[4096];

  snprintf(path, sizeof(path), "%s/%s", build_dir(), name);
  return path;
}

int itest_tmpdir(const char *name, char *out, size_t cap) {
  char cmd[4096 + 16];

  snprintf(out, cap, "%s/itest-work/%s-%d", build_dir(), name,
           (int)getpid());
  snprintf(cmd, sizeof(cmd), "rm -rf '%s'", out);
  if (system(cmd) != 0)
    return -1;
  snprintf(cmd, sizeof(cmd), "mkdir -p '%s/var'", out);
  return system(cmd) == 0 ? 0 : -1;
}

int itest_spawn(itest_proc *p, const char *dir, const char *name,
                char *const argv[], char *const env[]) {
  pid_t pid;

  snprintf(p->dir, sizeof(p->dir), "%s", dir);
  snprintf(p->log, sizeof(p->log), "%s/%s.log", dir, name);
  pid = fork();
  if (pid < 0)
    return -1;
  if (pid == 0) {
    int fd = open(p->log, O_WRONLY | O_CREAT | O_APPEND, 0644);

    if (fd < 0 || chdir(dir) != 0)
      _exit(127);
    dup2(fd, 1);
    dup2(fd, 2);
    /* The services' addresses reach a child only when the test says so,
     * so that a test without a user store runs fanoutd without one. */
    unsetenv("FANOUT_POSTGRES_DSN");
    unsetenv("FANOUT_REDIS_URL");
    for (size_t i = 0; env != NULL && env[i] != NULL; i++)
      putenv(env[i]);
    /* Leaks in a process killed on purpose are not findings. */
    setenv("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0", 0);
    execv(argv[0], argv);
    _exit(127);
  }
  p->pid = pid;
  return 0;
}

bool itest_alive(itest_proc *p) {
  int st;

  if (p->pid <= 0)
    return false;
  if (waitpid(p->pid, &st, WNOHANG) == p->pid) {
    p->pid = -1;
    return false;
  }
  return true;
}

int itest_stop(itest_proc *p, int sig, int timeout_ms) {
  int64_t deadline = itest_now_ms() + timeout_ms;
  int st;

  if (p->pid <= 0)
    return -1;
  kill(p->pid, sig);
  while (itest_now_ms() < deadline) {
    pid_t r = waitpid(p->pid, &st, WNOHANG);

    if (r == p->pid) {
      p->pid = -1;
      return st;
    }
    itest_sleep_ms(20);
  }
  kill(p->pid, SIGKILL);
  waitpid(p->pid, &st, 0);
  p->pid = -1;
  return -1;
}

char *itest_slurp(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  char *buf = NULL;
  size_t cap = 0, n = 0;

  if (f == NULL)
    return NULL;
  for (;;) {
    if (n + 4096 + 1 > cap) {
      char *nb;

      cap = cap ? cap * 2 : 8192;
      nb = realloc(buf, cap);
      if (nb == NULL) {
        free(buf);
        fclose(f);
        return NULL;
      }
      buf = nb;
    }
    size_t r = fread(buf + n, 1, 4096, f);

    n += r;
    if (r == 0)
      break;
  }
  fclose(f);
  buf[n] = '\0';
  if (len != NULL)
    *len = n;
  return buf;
}

int itest_wait_file(const char *path, int timeout_ms) {
  int64_t deadline = itest_now_ms() + timeout_ms;
  struct stat st;

  while (itest_now_ms() < deadline) {
    if (stat(path, &st) == 0 && st.st_size > 0)
      return 0;
    itest_sleep_ms(20);
  }
  return -1;
}

int itest_wait_log(itest_proc *p, const char *needle, int timeout_ms) {
  int64_t deadline = itest_now_ms() + timeout_ms;

  while (itest_now_ms() < deadline) {
    char *s = itest_slurp(p->log, NULL);
    bool found = s != NULL && strstr(s, needle) != NULL;

    free(s);
    if (found)
      return 0;
    itest_sleep_ms(50);
  }
  return -1;
}

size_t itest_count_lines(const char *path, const char *needle) {
  char *s = itest_slurp(path, NULL);
  size_t n = 0;
  char *save = NULL;

  if (s == NULL)
    return 0;
  for (char *l = strtok_r(s, "\n", &save); l != NULL;
       l = strtok_r(NULL, "\n", &save))
    if (needle == NULL || strstr(l, needle) != NULL)
      n++;
  free(s);
  return n;
}

int itest_start_broker(itest_proc *p, const char *dir, int partitions,
                       char *bootstrap, size_t cap) {
  char parts[16], file[600];
  char *argv[] = {(char *)itest_bin("fanout-devbroker"), "-p", parts, "-f",
                  "var/kafka.bootstrap", NULL};
  char *s;

  snprintf(parts, sizeof(parts), "%d", partitions);
  snprintf(file, sizeof(file), "%s/var/kafka.bootstrap", dir);
  unlink(file);
  if (itest_spawn(p, dir, "devbroker", argv, NULL) != 0)
    return -1;
  if (itest_wait_file(file, 10000) != 0)
    return -1;
  s = itest_slurp(file, NULL);
  if (s == NULL)
    return -1;
  s[strcspn(s, "\n")] = '\0';
  snprintf(bootstrap, cap, "%s", s);
  free(s);
  return 0;
}

int itest_write_config(const char *dir, const char *brokers,
                       const char *extra) {
  char path[600];
  FILE *f;

  snprintf(path, sizeof(path), "%s/fanout.ini", dir);
  f = fopen(path, "w");
  if (f == NULL)
    return -1;
  fprintf(f,
          "[log]\nlevel = info\n"
          "[kafka]\nbrokers = %s\nsession_timeout_ms = 3000\n"
          "embedded_partitions = 4\n"
          "[engine]\ncommit_interval_ms = 100\nsummary_interval_s = 1\n"
          "drain_timeout_ms = 10000\n"
          "[admin]\ntoken = test-admin-token-0123456789\n"
          "[relay]\njwt_secret = test-jwt-secret-0123456789\n"
          "[record]\nfile = deliveries.jsonl\n"
          "%s\n",
          brokers, extra != NULL ? extra : "");
  return fclose(f) == 0 ? 0 : -1;
}

int itest_start_fanoutd(itest_proc *p, const char *dir, char *const env[],
                        int timeout_ms) {
  char *argv[] = {(char *)itest_bin("fanoutd"), "-c", "fanout.ini", NULL};

  if (itest_spawn(p, dir, "fanoutd", argv, env) != 0)
    return -1;
  return itest_wait_log(p, "partitions assigned", timeout_ms);
}

static void dr_count(rd_kafka_t *rk, const rd_kafka_message_t *m,
                     void *opaque) {
  size_t *left = opaque;

  (void)rk;
  if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR)
    (*left)--;
}

int itest_produce(const char *bootstrap, const char *topic,
                  const char *const *values, size_t n) {
  rd_kafka_conf_t *conf = rd_kafka_conf_new();
  char err[256];
  size_t left = n;
  rd_kafka_t *rk;
  int64_t deadline;

  rd_kafka_conf_set(conf, "bootstrap.servers", bootstrap, err, sizeof(err));
  rd_kafka_conf_set(conf, "linger.ms", "5", err, sizeof(err));
  rd_kafka_conf_set_dr_msg_cb(conf, dr_count);
  rd_kafka_conf_set_opaque(conf, &left);
  rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof(err));
  if (rk == NULL)
    return -1;
  for (size_t i = 0; i < n; i++) {
    while (rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(topic),
                             RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                             RD_KAFKA_V_VALUE((void *)values[i],
                                              strlen(values[i])),
                             RD_KAFKA_V_END) ==
           RD_KAFKA_RESP_ERR__QUEUE_FULL)
      rd_kafka_poll(rk, 10);
    rd_kafka_poll(rk, 0);
  }
  deadline = itest_now_ms() + 30000;
  while (left > 0 && itest_now_ms() < deadline)
    rd_kafka_poll(rk, 50);
  rd_kafka_destroy(rk);
  return left == 0 ? 0 : -1;
}

static rd_kafka_t *plain_consumer(const char *bootstrap, const char *group) {
  rd_kafka_conf_t *conf = rd_kafka_conf_new();
  char err[256];
  rd_kafka_t *rk;

  rd_kafka_conf_set(conf, "bootstrap.servers", bootstrap, err, sizeof(err));
  rd_kafka_conf_set(conf, "group.id", group, err, sizeof(err));
  rd_kafka_conf_set(conf, "enable.auto.commit", "false", err, sizeof(err));
  rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, err, sizeof(err));
  return rk;
}

size_t itest_consume(const char *bootstrap, const char *topic, size_t want,
                     int timeout_ms, itest_msg **out) {
  rd_kafka_t *rk = plain_consumer(bootstrap, "itest-reader");
  const rd_kafka_metadata_t *md = NULL;
  rd_kafka_topic_partition_list_t *list;
  rd_kafka_topic_t *t;
  itest_msg *msgs = calloc(want + 1, sizeof(*msgs));
  int64_t deadline = itest_now_ms() + timeout_ms;
  size_t got = 0;

  *out = msgs;
  if (rk == NULL || msgs == NULL)
    return 0;

  /* Read every partition from the start, outside any group. */
  t = rd_kafka_topic_new(rk, topic, NULL);
  list = rd_kafka_topic_partition_list_new(8);
  if (rd_kafka_metadata(rk, 0, t, &md, 5000) == RD_KAFKA_RESP_ERR_NO_ERROR &&
      md->topic_cnt == 1) {
    for (int i = 0; i < md->topics[0].partition_cnt; i++)
      rd_kafka_topic_partition_list_add(list, topic,
                                        md->topics[0].partitions[i].id)
          ->offset = RD_KAFKA_OFFSET_BEGINNING;
  }
  if (md != NULL)
    rd_kafka_metadata_destroy(md);
  rd_kafka_topic_destroy(t);
  rd_kafka_assign(rk, list);
  rd_kafka_topic_partition_list_destroy(list);

  while (got < want && itest_now_ms() < deadline) {
    rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 100);
    rd_kafka_headers_t *hdrs = NULL;
    char hbuf[2048] = "";

    if (m == NULL)
      continue;
    if (m->err != RD_KAFKA_RESP_ERR_NO_ERROR) {
      rd_kafka_message_destroy(m);
      continue;
    }
    if (rd_kafka_message_headers(m, &hdrs) == RD_KAFKA_RESP_ERR_NO_ERROR) {
      const char *name;
      const void *val;
      size_t vlen, used = 0;

      for (size_t i = 0;
           rd_kafka_header_get_all(hdrs, i, &name, &val, &vlen) ==
           RD_KAFKA_RESP_ERR_NO_ERROR;
           i++)
        used += (size_t)snprintf(hbuf + used, sizeof(hbuf) - used,
                                 "%s=%.*s\n", name, (int)vlen,
                                 (const char *)val);
    }
    msgs[got].value = malloc(m->len + 1);
    memcpy(msgs[got].value, m->payload, m->len);
    msgs[got].value[m->len] = '\0';
    msgs[got].len = m->len;
    msgs[got].headers = strdup(hbuf);
    got++;
    rd_kafka_message_destroy(m);
  }
  rd_kafka_consumer_close(rk);
  rd_kafka_destroy(rk);
  return got;
}

void itest_msgs_free(itest_msg *m, size_t n) {
  for (size_t i = 0; i < n; i++) {
    free(m[i].value);
    free(m[i].headers);
  }
  free(m);
}

int64_t itest_committed(const char *bootstrap, const char *group,
                        const char *topic) {
  rd_kafka_t *rk = plain_consumer(bootstrap, group);
  rd_kafka_topic_partition_list_t *list;
  int64_t sum = 0;

  if (rk == NULL)
    return -1;
  list = rd_kafka_topic_partition_list_new(64);
  for (int p = 0; p < 64; p++)
    rd_kafka_topic_partition_list_add(list, topic, p);
  if (rd_kafka_committed(rk, list, 5000) != RD_KAFKA_RESP_ERR_NO_ERROR)
    sum = -1;
  for (int i = 0; sum >= 0 && i < list->cnt; i++)
    if (list->elems[i].err == RD_KAFKA_RESP_ERR_NO_ERROR &&
        list->elems[i].offset > 0)
      sum += list->elems[i].offset;
  rd_kafka_topic_partition_list_destroy(list);
  rd_kafka_destroy(rk);
  return sum;
}

/* ---- services (PostgreSQL, HTTP) ---- */

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <curl/curl.h>
#include <libpq-fe.h>

int itest_db_create(const char *name, char *dsn, size_t cap) {
  const char *base = getenv("FANOUT_POSTGRES_DSN");
  char db[96], sql[160];
  const char *slash;
  PGconn *c;
  PGresult *r;
  int ok;

  if (base == NULL)
    return -1;
  snprintf(db, sizeof(db), "fanout_it_%s_%d", name, (int)getpid());
  c = PQconnectdb(base);
  if (PQstatus(c) != CONNECTION_OK) {
    PQfinish(c);
    return -1;
  }
  snprintf(sql, sizeof(sql), "DROP DATABASE IF EXISTS %s", db);
  PQclear(PQexec(c, sql));
  snprintf(sql, sizeof(sql), "CREATE DATABASE %s", db);
  r = PQexec(c, sql);
  ok = PQresultStatus(r) == PGRES_COMMAND_OK;
  PQclear(r);
  PQfinish(c);
  if (!ok)
    return -1;

  /* The base DSN is a URI whose last path segment is the database. */
  slash = strrchr(base, '/');
  if (slash == NULL)
    return -1;
  snprintf(dsn, cap, "%.*s/%s", (int)(slash - base), base, db);
  return 0;
}

void itest_db_drop(const char *dsn) {
  const char *base = getenv("FANOUT_POSTGRES_DSN");
  const char *db = strrchr(dsn, '/');
  char sql[200];
  PGconn *c;

  /* ITEST_KEEP_DB=1 keeps the database for a look after a failure. */
  if (base == NULL || db == NULL || getenv("ITEST_KEEP_DB") != NULL)
    return;
  c = PQconnectdb(base);
  if (PQstatus(c) == CONNECTION_OK) {
    snprintf(sql, sizeof(sql), "DROP DATABASE IF EXISTS %s WITH (FORCE)",
             db + 1);
    PQclear(PQexec(c, sql));
  }
  PQfinish(c);
}

long itest_sql(const char *dsn, const char *sql) {
  PGconn *c = PQconnectdb(dsn);
  PGresult *r;
  long v = -1;

  if (PQstatus(c) == CONNECTION_OK) {
    r = PQexec(c, sql);
    if (PQresultStatus(r) == PGRES_TUPLES_OK)
      v = PQntuples(r) > 0 ? atol(PQgetvalue(r, 0, 0)) : 0;
    else if (PQresultStatus(r) == PGRES_COMMAND_OK)
      v = atol(PQcmdTuples(r));
    PQclear(r);
  }
  PQfinish(c);
  return v;
}

int itest_free_port(void) {
  struct sockaddr_in a = {.sin_family = AF_INET};
  socklen_t len = sizeof(a);
  int fd = socket(AF_INET, SOCK_STREAM, 0), port = -1;

  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
      getsockname(fd, (struct sockaddr *)&a, &len) == 0)
    port = ntohs(a.sin_port);
  if (fd >= 0)
    close(fd);
  return port;
}

typedef struct http_buf {
  char *data;
  size_t len;
} http_buf;

static size_t http_write(char *p, size_t size, size_t n, void *arg) {
  http_buf *b = arg;
  char *nd = realloc(b->data, b->len + size * n + 1);

  if (nd == NULL)
    return 0;
  memcpy(nd + b->len, p, size * n);
  b->len += size * n;
  nd[b->len] = '\0';
  b->data = nd;
  return size * n;
}

long itest_http_raw(const char *method, const char *url, const char *ca,
                    const char *const *headers, const char *body,
                    char **resp) {
  CURL *h = curl_easy_init();
  struct curl_slist *hdrs = NULL;
  http_buf b = {NULL, 0};
  long status = -1;

  if (h == NULL)
    return -1;
  for (size_t i = 0; headers != NULL && headers[i] != NULL; i++)
    hdrs = curl_slist_append(hdrs, headers[i]);
  if (body != NULL)
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
  if (ca != NULL)
    curl_easy_setopt(h, CURLOPT_CAINFO, ca);
  curl_easy_setopt(h, CURLOPT_URL, url);
  curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, http_write);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
  curl_easy_setopt(h, CURLOPT_TIMEOUT, 10L);
  if (curl_easy_perform(h) == CURLE_OK)
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
  curl_slist_free_all(hdrs);
  curl_easy_cleanup(h);
  if (resp != NULL)
    *resp = b.data != NULL ? b.data : strdup("");
  else
    free(b.data);
  return status;
}

int itest_http(const char *method, const char *url, const char *token,
               const char *body, char **resp) {
  const char *headers[3] = {NULL, NULL, NULL};
  char auth[512];
  size_t n = 0;

  if (token != NULL) {
    snprintf(auth, sizeof(auth), "Authorization: Bearer %s", token);
    headers[n++] = auth;
  }
  if (body != NULL)
    headers[n++] = "Content-Type: application/json";
  return (int)itest_http_raw(method, url, NULL, headers, body, resp);
}

/* ---- a fanoutd node and its admin API ---- */

int itest_node_start(itest_node *n, const char *name, int port,
                     const char *bootstrap, const char *dsn,
                     const char *redis, const char *extra) {
  char cfg[4096], dsn_env[600], redis_env[300];
  char *env[] = {dsn_env, redis_env, NULL};
  const char *rurl = redis != NULL ? redis : getenv("FANOUT_REDIS_URL");

  if (itest_tmpdir(name, n->dir, sizeof(n->dir)) != 0)
    return -1;
  n->port = port > 0 ? port : itest_free_port();
  snprintf(cfg, sizeof(cfg), "[admin]\nlisten = 127.0.0.1:%d\n%s", n->port,
           extra != NULL ? extra : "");
  if (itest_write_config(n->dir, bootstrap, cfg) != 0)
    return -1;
  snprintf(dsn_env, sizeof(dsn_env), "FANOUT_POSTGRES_DSN=%s", dsn);
  snprintf(redis_env, sizeof(redis_env), "FANOUT_REDIS_URL=%s",
           rurl != NULL ? rurl : "");
  if (itest_start_fanoutd(&n->proc, n->dir, env, 30000) != 0)
    return -1;
  return itest_wait_log(&n->proc, "admin API listening", 5000);
}

int itest_api(const itest_node *n, const char *method, const char *path,
              const char *body, char **resp) {
  char url[600];

  snprintf(url, sizeof(url), "http://127.0.0.1:%d%s", n->port, path);
  return itest_http(method, url, ITEST_ADMIN_TOKEN, body, resp);
}

json_t *itest_delivery(const itest_node *n, const char *event,
                       const char *user, const char *channel) {
  char path[256];
  char *resp = NULL;
  json_t *doc, *d, *out = NULL;
  size_t i;

  snprintf(path, sizeof(path), "/v1/events/%s", event);
  if (itest_api(n, "GET", path, NULL, &resp) != 200) {
    free(resp);
    return NULL;
  }
  doc = json_loads(resp, 0, NULL);
  free(resp);
  json_array_foreach(json_object_get(doc, "deliveries"), i, d) {
    const char *u = json_string_value(json_object_get(d, "user"));
    const char *c = json_string_value(json_object_get(d, "channel"));

    if (u != NULL && c != NULL && strcmp(u, user) == 0 &&
        strcmp(c, channel) == 0) {
      json_decref(out);
      out = json_incref(d);
    }
  }
  json_decref(doc);
  return out;
}

void itest_outcome(const json_t *d, char *out, size_t cap) {
  const char *st = json_string_value(json_object_get(d, "status"));
  const char *why = json_string_value(json_object_get(d, "reason"));

  snprintf(out, cap, "%s%s%s", st != NULL ? st : "?",
           why != NULL && why[0] != '\0' ? ":" : "",
           why != NULL ? why : "");
}

json_t *itest_wait_outcome(const itest_node *n, const char *event,
                           const char *user, const char *channel,
                           const char *want, bool prefix, int timeout_ms,
                           char *got, size_t cap) {
  int64_t end = itest_now_ms() + timeout_ms;

  snprintf(got, cap, "(none)");
  for (;;) {
    json_t *d = itest_delivery(n, event, user, channel);

    if (d != NULL) {
      itest_outcome(d, got, cap);
      if (prefix ? strncmp(got, want, strlen(want)) == 0
                 : strcmp(got, want) == 0)
        return d;
      json_decref(d);
    }
    if (itest_now_ms() > end)
      return NULL;
    itest_sleep_ms(50);
  }
}

/* ---- provider fakes ---- */

int itest_fake_start(itest_fake *f, const char *bin, const char *name,
                     const char *const *args) {
  char dir[512], path[600], port_s[16], *log, *p;
  char *argv[32] = {path, "--port", "0", "--ca", f->ca};
  size_t n = 5;

  for (size_t i = 0; args != NULL && args[i] != NULL; i++) {
    if (n + 1 >= sizeof(argv) / sizeof(argv[0]))
      return -1;
    argv[n++] = (char *)args[i];
  }
  argv[n] = NULL;
  if (itest_tmpdir(name, dir, sizeof(dir)) != 0)
    return -1;
  snprintf(f->ca, sizeof(f->ca), "%s/ca.pem", dir);
  snprintf(path, sizeof(path), "%s", itest_bin(bin));
  if (itest_spawn(&f->proc, dir, "fake", argv, NULL) != 0 ||
      itest_wait_log(&f->proc, "listening port=", 10000) != 0)
    return -1;
  log = itest_slurp(f->proc.log, NULL);
  p = log != NULL ? strstr(log, "listening port=") : NULL;
  if (p == NULL || sscanf(p, "listening port=%15[0-9]", port_s) != 1) {
    free(log);
    return -1;
  }
  snprintf(f->url, sizeof(f->url), "https://127.0.0.1:%s", port_s);
  free(log);
  return 0;
}

long itest_fake_call(const itest_fake *f, const char *method,
                     const char *path, const char *body, char **resp) {
  char url[600];

  snprintf(url, sizeof(url), "%s%s", f->url, path);
  return itest_http_raw(method, url, f->ca, NULL, body, resp);
}
