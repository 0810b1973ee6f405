/* SPDX-License-Identifier: MIT */
/*
 * Unit tests for the HTTPS client against the fake HTTPS server in the
 * same process, over real TLS with the server's certificate as the only
 * extra CA: status, body and headers (looked up without case); a binary
 * body with NUL bytes both ways; basic auth and custom headers reaching
 * the server; a 429 with its Retry-After; the response body cap; timeout,
 * dropped connection, refused connection and an untrusted certificate
 * each ending with status 0 and a reason; FO_EFULL at max_inflight; the
 * tick on the client's thread; stop with requests in flight completing
 * every callback; 2,000 requests completing exactly once over a few
 * reused connections.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "fakehttp.h"
#include "fanout/common.h"
#include "http.h"
#include "log.h"
#include "metrics.h"

#define WAIT_MS 20000
#define BIG_BODY (1536 * 1024)
#define BODY_CAP (1024 * 1024)
#define MANY 2000

/* ---- the server side ---- */

static fake_http *g_srv;
static char g_dir[256];
static char g_ca[300];
static char g_base[64];

static uint32_t fnv1a(const char *p, size_t n) {
  uint32_t h = 2166136261u;
  size_t i;

  for (i = 0; i < n; i++) {
    h ^= (unsigned char)p[i];
    h *= 16777619u;
  }
  return h;
}

static long query_long(const char *q, const char *key, long def) {
  size_t kl = strlen(key);
  const char *p = q;

  while (p != NULL && *p != '\0') {
    if (strncmp(p, key, kl) == 0 && p[kl] == '=')
      return strtol(p + kl + 1, NULL, 10);
    p = strchr(p, '&');
    if (p != NULL)
      p++;
  }
  return def;
}

static const char *or_dash(const char *s) {
  return s != NULL ? s : "-";
}

/* Describes the request, one "key=value" a line, so that each test reads
 * what the server saw in its own response. */
static char *describe(const fake_request *req) {
  char *s = NULL;

  if (asprintf(&s,
               "method=%s\npath=%s\nquery=%s\nlen=%zu\nsum=%08x\n"
               "auth=%s\ncustom=%s\nexpect=%s\nctype=%s\n",
               req->method, req->path, req->query, req->body_len,
               fnv1a(req->body, req->body_len),
               or_dash(fake_header(req, "authorization")),
               or_dash(fake_header(req, "X-Custom")),
               or_dash(fake_header(req, "Expect")),
               or_dash(fake_header(req, "Content-Type"))) < 0)
    return NULL;
  return s;
}

static void srv_handler(void *arg, const fake_request *req,
                        fake_response *resp) {
  long n;

  (void)arg;
  resp->content_type = "text/plain";
  if (strcmp(req->path, "/drop") == 0) {
    resp->drop = 1;
  } else if (strcmp(req->path, "/status") == 0) {
    resp->status = (int)query_long(req->query, "code", 500);
    resp->content_type = NULL;
    resp->headers[0] = "Retry-After: 7";
    resp->body = strdup("{\"code\":20429,\"message\":\"Too Many\"}");
  } else if (strcmp(req->path, "/big") == 0) {
    n = query_long(req->query, "n", 0);
    resp->body = malloc((size_t)n + 1);
    if (resp->body != NULL) {
      memset(resp->body, 'x', (size_t)n);
      resp->body[n] = '\0';
    }
  } else {
    if (strcmp(req->path, "/slow") == 0)
      resp->delay_ms = (int)query_long(req->query, "ms", 1000);
    resp->headers[0] = "X-Reply: yes";
    resp->headers[1] = "X-Spaced:   padded value  ";
    resp->body = describe(req);
  }
}

static int group_setup(void **state) {
  const char *base = getenv("TMPDIR");

  (void)state;
  if (base == NULL || base[0] == '\0')
    base = P_tmpdir;
  snprintf(g_dir, sizeof(g_dir), "%s/fanout-http-XXXXXX", base);
  if (mkdtemp(g_dir) == NULL)
    return -1;
  snprintf(g_ca, sizeof(g_ca), "%s/ca.pem", g_dir);
  g_srv = fake_http_start(0, g_ca, srv_handler, NULL);
  if (g_srv == NULL)
    return -1;
  snprintf(g_base, sizeof(g_base), "https://127.0.0.1:%d",
           fake_http_port(g_srv));
  return 0;
}

static int group_teardown(void **state) {
  (void)state;
  fake_http_stop(g_srv);
  unlink(g_ca);
  rmdir(g_dir);
  return 0;
}

/* ---- the client side ---- */

/* What one callback saw; the response is only valid during the call. */
typedef struct result {
  int calls;
  long status;
  bool timed_out;
  char error[512];
  char *body;
  size_t body_len;
  char reply[64];
  char reply_upper[64];
  char spaced[64];
  char retry_after[32];
  char ctype[64];
  pthread_t thread;
} result;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;
static int g_done;

static void copy_header(char *dst, size_t n, const fo_http_response *r,
                        const char *name) {
  const char *v = fo_http_header(r, name);

  snprintf(dst, n, "%s", v != NULL ? v : "-");
}

static void on_done(void *arg, const fo_http_response *r) {
  result *res = arg;
  const char *body;
  size_t len;

  body = fo_http_body(r, &len);
  pthread_mutex_lock(&g_mu);
  res->calls++;
  res->status = fo_http_status(r);
  res->timed_out = fo_http_timed_out(r);
  snprintf(res->error, sizeof(res->error), "%s", fo_http_error(r));
  free(res->body);
  res->body = malloc(len + 1);
  if (res->body != NULL) {
    memcpy(res->body, body, len);
    res->body[len] = '\0';
  }
  res->body_len = len;
  copy_header(res->reply, sizeof(res->reply), r, "x-reply");
  copy_header(res->reply_upper, sizeof(res->reply_upper), r, "X-REPLY");
  copy_header(res->spaced, sizeof(res->spaced), r, "x-spaced");
  copy_header(res->retry_after, sizeof(res->retry_after), r, "Retry-After");
  copy_header(res->ctype, sizeof(res->ctype), r, "content-type");
  res->thread = pthread_self();
  g_done++;
  pthread_cond_broadcast(&g_cv);
  pthread_mutex_unlock(&g_mu);
}

static void reset_done(void) {
  pthread_mutex_lock(&g_mu);
  g_done = 0;
  pthread_mutex_unlock(&g_mu);
}

/* Waits until `n` callbacks ran in all, or `ms` passed; returns the count. */
static int wait_done(int n, int ms) {
  struct timespec ts;
  int done;

  clock_gettime(CLOCK_REALTIME, &ts);
  ts.tv_sec += ms / 1000;
  ts.tv_nsec += (long)(ms % 1000) * 1000000L;
  if (ts.tv_nsec >= 1000000000L) {
    ts.tv_sec++;
    ts.tv_nsec -= 1000000000L;
  }
  pthread_mutex_lock(&g_mu);
  while (g_done < n) {
    if (pthread_cond_timedwait(&g_cv, &g_mu, &ts) != 0)
      break;
  }
  done = g_done;
  pthread_mutex_unlock(&g_mu);
  return done;
}

static fo_http *new_client(const char *ca, int max_inflight, int conns) {
  fo_http_conf c;
  fo_http *h = NULL;

  memset(&c, 0, sizeof(c));
  c.name = "test";
  c.ca_file = ca;
  c.max_inflight = max_inflight;
  c.max_connections = conns;
  assert_int_equal(fo_http_new(&c, &h), FO_OK);
  assert_non_null(h);
  return h;
}

static int send_req(fo_http *h, const char *method, const char *path,
                    const char *body, size_t len, const char *const *hdrs,
                    const char *userpwd, int timeout_ms, result *res) {
  fo_http_request req;
  char url[256];

  snprintf(url, sizeof(url), "%s%s", g_base, path);
  memset(&req, 0, sizeof(req));
  req.method = method;
  req.url = url;
  req.headers = hdrs;
  req.body = body;
  req.body_len = len;
  req.userpwd = userpwd;
  req.timeout_ms = timeout_ms;
  return fo_http_send(h, &req, on_done, res);
}

/* Runs one request to completion on a fresh client. */
static void run_one(const char *ca, const char *method, const char *path,
                    const char *body, size_t len, const char *const *hdrs,
                    const char *userpwd, int timeout_ms, result *res) {
  fo_http *h = new_client(ca, 4, 2);

  reset_done();
  assert_int_equal(send_req(h, method, path, body, len, hdrs, userpwd,
                            timeout_ms, res),
                   FO_OK);
  assert_int_equal(wait_done(1, WAIT_MS), 1);
  fo_http_stop(h, 1000);
  fo_http_free(h);
  assert_int_equal(res->calls, 1);
}

static void result_clear(result *res) {
  free(res->body);
  memset(res, 0, sizeof(*res));
}

/* ---- tests ---- */

static void test_get_status_body_headers(void **state) {
  result res = {0};

  (void)state;
  run_one(g_ca, "GET", "/echo?a=1&b=two%20words", NULL, 0, NULL, NULL, 0,
          &res);
  assert_int_equal(res.status, 200);
  assert_false(res.timed_out);
  assert_string_equal(res.error, "");
  assert_non_null(strstr(res.body, "method=GET\n"));
  assert_non_null(strstr(res.body, "path=/echo\n"));
  assert_non_null(strstr(res.body, "query=a=1&b=two%20words\n"));
  assert_non_null(strstr(res.body, "len=0\n"));
  /* No credentials unless asked for. */
  assert_non_null(strstr(res.body, "auth=-\n"));
  assert_string_equal(res.reply, "yes");
  assert_string_equal(res.reply_upper, "yes");
  assert_string_equal(res.spaced, "padded value");
  assert_string_equal(res.ctype, "text/plain");
  assert_string_equal(res.retry_after, "-");
  assert_false(pthread_equal(res.thread, pthread_self()));
  result_clear(&res);
}

static void test_post_binary_body(void **state) {
  result res = {0};
  char *body = malloc(BIG_BODY);
  char want[64];
  size_t i;

  (void)state;
  assert_non_null(body);
  for (i = 0; i < BIG_BODY; i++)
    body[i] = (char)((i * 7) % 256);
  assert_int_equal(body[0], 0);

  run_one(g_ca, "POST", "/echo", body, BIG_BODY, NULL, NULL, 0, &res);
  assert_int_equal(res.status, 200);
  assert_non_null(strstr(res.body, "method=POST\n"));
  snprintf(want, sizeof(want), "len=%d\nsum=%08x\n", BIG_BODY,
           fnv1a(body, BIG_BODY));
  assert_non_null(strstr(res.body, want));
  /* A large body goes at once, without waiting for 100 Continue. */
  assert_non_null(strstr(res.body, "expect=-\n"));
  result_clear(&res);

  /* A short one with NUL bytes inside, by another method. */
  run_one(g_ca, "PUT", "/echo", "a\0b\0c", 5, NULL, NULL, 0, &res);
  assert_int_equal(res.status, 200);
  assert_non_null(strstr(res.body, "method=PUT\n"));
  snprintf(want, sizeof(want), "len=5\nsum=%08x\n", fnv1a("a\0b\0c", 5));
  assert_non_null(strstr(res.body, want));
  result_clear(&res);
  free(body);
}

static void test_auth_and_custom_headers(void **state) {
  const char *const hdrs[] = {"X-Custom: hello world",
                              "Content-Type: application/json", NULL};
  result res = {0};

  (void)state;
  run_one(g_ca, "POST", "/echo", "{}", 2, hdrs, "AC123:s3cret", 0, &res);
  assert_int_equal(res.status, 200);
  assert_non_null(strstr(res.body, "auth=Basic QUMxMjM6czNjcmV0\n"));
  assert_non_null(strstr(res.body, "custom=hello world\n"));
  assert_non_null(strstr(res.body, "ctype=application/json\n"));
  result_clear(&res);
}

static uint64_t requests_counted(const char *code) {
  char labels[64];

  snprintf(labels, sizeof(labels), "client=\"test\",code=\"%s\"", code);
  return fo_counter_value(
      fo_metrics_counter("fanout_http_requests_total", "", labels));
}

static void test_429_retry_after(void **state) {
  result res = {0};
  uint64_t n429 = requests_counted("429");

  (void)state;
  run_one(g_ca, "POST", "/status?code=429", "x", 1, NULL, NULL, 0, &res);
  assert_int_equal(requests_counted("429"), n429 + 1);
  assert_int_equal(res.status, 429);
  assert_string_equal(res.error, "");
  assert_string_equal(res.retry_after, "7");
  assert_string_equal(res.ctype, "application/json");
  assert_non_null(strstr(res.body, "\"code\":20429"));
  result_clear(&res);
}

static void test_body_is_capped(void **state) {
  result res = {0};
  size_t i;

  (void)state;
  run_one(g_ca, "GET", "/big?n=2000000", NULL, 0, NULL, NULL, 0, &res);
  assert_int_equal(res.status, 200);
  assert_int_equal(res.body_len, BODY_CAP);
  for (i = 0; i < res.body_len; i++) {
    if (res.body[i] != 'x')
      fail_msg("byte %zu is %d", i, res.body[i]);
  }
  result_clear(&res);
}

static void test_timeout(void **state) {
  result res = {0};
  int64_t t0 = fo_now_ms(), took;

  (void)state;
  run_one(g_ca, "POST", "/slow?ms=2000", "x", 1, NULL, NULL, 300, &res);
  took = fo_now_ms() - t0;
  assert_int_equal(res.status, 0);
  assert_true(res.timed_out);
  assert_true(res.error[0] != '\0');
  assert_int_equal(res.body_len, 0);
  assert_true(took < 1500);
  result_clear(&res);
}

static void test_dropped_connection(void **state) {
  result res = {0};
  uint64_t nerr = requests_counted("error");

  (void)state;
  run_one(g_ca, "POST", "/drop", "x", 1, NULL, NULL, 5000, &res);
  assert_int_equal(requests_counted("error"), nerr + 1);
  assert_int_equal(res.status, 0);
  assert_false(res.timed_out);
  assert_true(res.error[0] != '\0');
  result_clear(&res);
}

static void test_refused_connection(void **state) {
  struct sockaddr_in sa;
  socklen_t slen = sizeof(sa);
  char saved[64];
  result res = {0};
  int fd = socket(AF_INET, SOCK_STREAM, 0);

  (void)state;
  /* A port that was free a moment ago, with nobody listening. */
  assert_true(fd >= 0);
  memset(&sa, 0, sizeof(sa));
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
  assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &slen), 0);
  close(fd);

  snprintf(saved, sizeof(saved), "%s", g_base);
  snprintf(g_base, sizeof(g_base), "https://127.0.0.1:%d",
           ntohs(sa.sin_port));
  run_one(g_ca, "GET", "/echo", NULL, 0, NULL, NULL, 5000, &res);
  snprintf(g_base, sizeof(g_base), "%s", saved);
  assert_int_equal(res.status, 0);
  assert_false(res.timed_out);
  assert_non_null(strstr(res.error, "onnect"));
  result_clear(&res);
}

static void test_localhost_name(void **state) {
  char saved[64];
  result res = {0};

  (void)state;
  /* The certificate names localhost too. */
  snprintf(saved, sizeof(saved), "%s", g_base);
  snprintf(g_base, sizeof(g_base), "https://localhost:%d",
           fake_http_port(g_srv));
  run_one(g_ca, "GET", "/echo", NULL, 0, NULL, NULL, 5000, &res);
  snprintf(g_base, sizeof(g_base), "%s", saved);
  assert_int_equal(res.status, 200);
  assert_string_equal(res.error, "");
  result_clear(&res);
}

static void test_untrusted_certificate(void **state) {
  result res = {0};

  (void)state;
  run_one(NULL, "GET", "/echo", NULL, 0, NULL, NULL, 5000, &res);
  assert_int_equal(res.status, 0);
  assert_false(res.timed_out);
  assert_non_null(strcasestr(res.error, "certificate"));
  result_clear(&res);
}

static void test_full_then_stop(void **state) {
  result res[3];
  fo_http *h = new_client(g_ca, 2, 2);
  int64_t t0;
  int i;

  (void)state;
  memset(res, 0, sizeof(res));
  reset_done();
  assert_int_equal(send_req(h, "POST", "/slow?ms=5000", "a", 1, NULL, NULL,
                            0, &res[0]),
                   FO_OK);
  assert_int_equal(send_req(h, "POST", "/slow?ms=5000", "b", 1, NULL, NULL,
                            0, &res[1]),
                   FO_OK);
  assert_int_equal(send_req(h, "POST", "/echo", "c", 1, NULL, NULL, 0,
                            &res[2]),
                   FO_EFULL);
  assert_int_equal(fo_http_inflight(h), 2);

  t0 = fo_now_ms();
  fo_http_stop(h, 200);
  assert_true(fo_now_ms() - t0 < 2000);
  assert_int_equal(wait_done(2, 0), 2);
  for (i = 0; i < 2; i++) {
    assert_int_equal(res[i].calls, 1);
    assert_int_equal(res[i].status, 0);
    assert_string_equal(res[i].error, "shutdown");
  }
  assert_int_equal(res[2].calls, 0);
  assert_int_equal(fo_http_inflight(h), 0);
  assert_int_equal(send_req(h, "GET", "/echo", NULL, 0, NULL, NULL, 0,
                            &res[2]),
                   FO_ECLOSED);
  fo_http_stop(h, 0);
  fo_http_free(h);
  assert_int_equal(res[2].calls, 0);
  for (i = 0; i < 3; i++)
    result_clear(&res[i]);
}

static void test_stop_with_requests_in_flight(void **state) {
  enum { N = 20 };
  result res[N];
  fo_http *h = new_client(g_ca, 64, 32);
  int i;

  (void)state;
  memset(res, 0, sizeof(res));
  reset_done();
  for (i = 0; i < N; i++) {
    assert_int_equal(send_req(h, "POST",
                              i % 2 == 0 ? "/echo" : "/slow?ms=8000", "x",
                              1, NULL, NULL, 0, &res[i]),
                     FO_OK);
  }
  /* The quick ones finish within the grace period (there are enough
   * connections that the stalled ones hold none they need); the stalled
   * ones are ended by it. */
  fo_http_stop(h, 1500);
  assert_int_equal(wait_done(N, 0), N);
  for (i = 0; i < N; i++) {
    assert_int_equal(res[i].calls, 1);
    if (i % 2 == 0) {
      assert_int_equal(res[i].status, 200);
    } else {
      assert_int_equal(res[i].status, 0);
      assert_string_equal(res[i].error, "shutdown");
    }
  }
  fo_http_free(h);
  for (i = 0; i < N; i++)
    result_clear(&res[i]);
}

/* A callback that queues the next request itself, while the client is at
 * its bound of one: the finished request no longer counts. */
typedef struct chain {
  fo_http *h;
  int left;
  int sent_ok;
  long last_status;
} chain;

static void on_chain(void *arg, const fo_http_response *r) {
  chain *c = arg;
  fo_http_request req;
  char url[128];

  c->last_status = fo_http_status(r);
  if (c->left > 0) {
    snprintf(url, sizeof(url), "%s/echo", g_base);
    memset(&req, 0, sizeof(req));
    req.method = "GET";
    req.url = url;
    c->left--;
    if (fo_http_send(c->h, &req, on_chain, c) == FO_OK)
      c->sent_ok++;
  }
  pthread_mutex_lock(&g_mu);
  g_done++;
  pthread_cond_broadcast(&g_cv);
  pthread_mutex_unlock(&g_mu);
}

static void test_send_from_callback(void **state) {
  chain c;
  fo_http_request req;
  char url[128];

  (void)state;
  memset(&c, 0, sizeof(c));
  c.h = new_client(g_ca, 1, 1);
  c.left = 5;
  reset_done();
  snprintf(url, sizeof(url), "%s/echo", g_base);
  memset(&req, 0, sizeof(req));
  req.method = "GET";
  req.url = url;
  assert_int_equal(fo_http_send(c.h, &req, on_chain, &c), FO_OK);
  assert_int_equal(wait_done(6, WAIT_MS), 6);
  fo_http_stop(c.h, 1000);
  fo_http_free(c.h);
  assert_int_equal(c.sent_ok, 5);
  assert_int_equal(c.last_status, 200);
}

typedef struct ticks {
  atomic_int n;
  pthread_t thread;
  atomic_bool same_thread;
} ticks;

static void on_tick(void *arg) {
  ticks *t = arg;

  if (atomic_fetch_add(&t->n, 1) == 0)
    t->thread = pthread_self();
  else if (!pthread_equal(t->thread, pthread_self()))
    atomic_store(&t->same_thread, false);
}

static void test_tick_on_client_thread(void **state) {
  fo_http_conf c;
  fo_http *h = NULL;
  ticks t;
  result res = {0};
  int n;

  (void)state;
  memset(&t, 0, sizeof(t));
  atomic_store(&t.same_thread, true);
  memset(&c, 0, sizeof(c));
  c.name = "tick";
  c.ca_file = g_ca;
  c.max_inflight = 4;
  c.tick_ms = 20;
  c.tick = on_tick;
  c.tick_arg = &t;
  assert_int_equal(fo_http_new(&c, &h), FO_OK);

  reset_done();
  assert_int_equal(send_req(h, "GET", "/echo", NULL, 0, NULL, NULL, 0, &res),
                   FO_OK);
  assert_int_equal(wait_done(1, WAIT_MS), 1);
  usleep(400 * 1000);
  fo_http_stop(h, 0);
  n = atomic_load(&t.n);
  /* 20 ms for at least 400 ms, with room for a slow machine. */
  assert_true(n >= 5);
  assert_true(atomic_load(&t.same_thread));
  assert_false(pthread_equal(t.thread, pthread_self()));
  assert_true(pthread_equal(t.thread, res.thread));
  usleep(100 * 1000);
  assert_int_equal(atomic_load(&t.n), n);
  fo_http_free(h);
  result_clear(&res);
}

/* One slot per request, to see that each completes exactly once. */
typedef struct slot {
  atomic_int calls;
  atomic_long status;
} slot;

static void on_slot(void *arg, const fo_http_response *r) {
  slot *s = arg;

  atomic_store(&s->status, fo_http_status(r));
  atomic_fetch_add(&s->calls, 1);
  pthread_mutex_lock(&g_mu);
  g_done++;
  pthread_cond_broadcast(&g_cv);
  pthread_mutex_unlock(&g_mu);
}

static void test_many_concurrent(void **state) {
  slot *slots = calloc(MANY, sizeof(*slots));
  fo_http *h = new_client(g_ca, 64, 4);
  fo_http_request req;
  char url[128], body[32];
  int conns0 = fake_http_connections(g_srv), conns, i, rc, full = 0;
  int64_t t0 = fo_now_ms(), took;

  (void)state;
  assert_non_null(slots);
  reset_done();
  snprintf(url, sizeof(url), "%s/echo", g_base);
  memset(&req, 0, sizeof(req));
  req.method = "POST";
  req.url = url;
  req.body = body;
  for (i = 0; i < MANY; i++) {
    req.body_len = (size_t)snprintf(body, sizeof(body), "request %d", i);
    while ((rc = fo_http_send(h, &req, on_slot, &slots[i])) == FO_EFULL) {
      full++;
      wait_done(i - 63, 50);
    }
    assert_int_equal(rc, FO_OK);
    assert_true(fo_http_inflight(h) <= 64);
  }
  assert_int_equal(wait_done(MANY, WAIT_MS * 3), MANY);
  took = fo_now_ms() - t0;
  fo_http_stop(h, 1000);
  fo_http_free(h);

  for (i = 0; i < MANY; i++) {
    if (atomic_load(&slots[i].calls) != 1 ||
        atomic_load(&slots[i].status) != 200)
      fail_msg("request %d: %d calls, status %ld", i,
               atomic_load(&slots[i].calls), atomic_load(&slots[i].status));
  }
  /* The bound was reached, so EFULL was seen. */
  assert_true(full > 0);
  conns = fake_http_connections(g_srv) - conns0;
  assert_true(conns >= 1);
  assert_true(conns <= 8);
  print_message("%d requests in %lld ms over %d connections\n", MANY,
                (long long)took, conns);
  free(slots);
}

static void test_bad_arguments(void **state) {
  fo_http_conf c;
  fo_http *h = NULL;
  const char *const bad_hdrs[] = {"X-A: b\r\nX-Injected: 1", NULL};
  result res = {0};

  (void)state;
  memset(&c, 0, sizeof(c));
  c.max_inflight = 0;
  assert_int_equal(fo_http_new(&c, &h), FO_EINVAL);
  assert_null(h);
  c.max_inflight = 1;
  c.tick_ms = -1;
  assert_int_equal(fo_http_new(&c, &h), FO_EINVAL);
  assert_null(h);

  h = new_client(g_ca, 2, 1);
  assert_int_equal(send_req(h, "GET", "/echo", NULL, 0, bad_hdrs, NULL, 0,
                            &res),
                   FO_EINVAL);
  assert_int_equal(send_req(h, "POST", "/echo", NULL, 5, NULL, NULL, 0,
                            &res),
                   FO_EINVAL);
  assert_int_equal(send_req(h, "GET", "/echo\r\nX: y", NULL, 0, NULL, NULL,
                            0, &res),
                   FO_EINVAL);
  assert_int_equal(fo_http_inflight(h), 0);
  fo_http_stop(h, 0);
  fo_http_free(h);
  assert_int_equal(res.calls, 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_get_status_body_headers),
      cmocka_unit_test(test_post_binary_body),
      cmocka_unit_test(test_auth_and_custom_headers),
      cmocka_unit_test(test_429_retry_after),
      cmocka_unit_test(test_body_is_capped),
      cmocka_unit_test(test_timeout),
      cmocka_unit_test(test_dropped_connection),
      cmocka_unit_test(test_refused_connection),
      cmocka_unit_test(test_localhost_name),
      cmocka_unit_test(test_untrusted_certificate),
      cmocka_unit_test(test_full_then_stop),
      cmocka_unit_test(test_stop_with_requests_in_flight),
      cmocka_unit_test(test_send_from_callback),
      cmocka_unit_test(test_tick_on_client_thread),
      cmocka_unit_test(test_many_concurrent),
      cmocka_unit_test(test_bad_arguments),
  };

  fo_log_set_level(FO_LOG_WARN);
  return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
