/* SPDX-License-Identifier: MIT */
/*
 * Unit tests of the preference model: defaults, the contract's example,
 * every refusal with the field it names, category overrides in
 * fo_prefs_allows(), the canonical document and its round trip, the
 * examples of RFC 7396 for the merge patch, time zone names, and
 * allocation failures.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "fanout/common.h"
#include "fanout/event.h"
#include "prefs.h"

#define ALL FO_CH_MASK_ALL
#define BIT(ch) (1u << (ch))

static const char example[] =
  "{\"channels\": {\"push\": true, \"email\": true, \"sms\": false,"
  "               \"inapp\": true},"
  " \"categories\": {\"marketing\": {\"email\": false, \"push\": false}},"
  " \"quiet_hours\": {\"start\": \"22:00\", \"end\": \"07:00\","
  "                 \"timezone\": \"Europe/Paris\","
  "                 \"channels\": [\"push\", \"sms\"]},"
  " \"caps\": {\"push\": {\"limit\": 10, \"per\": \"hour\"},"
  "          \"sms\": {\"limit\": 3, \"per\": \"day\"}}}";

static json_t *load(const char *s) {
  json_error_t jerr;
  json_t *v = json_loads(s, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);

  if (!v) {
    fail_msg("bad test JSON (%s): %s", jerr.text, s);
  }
  return v;
}

static int parse_str(const char *s, fo_prefs *p, fo_prefs_error *err) {
  json_t *doc = load(s);
  int rc = fo_prefs_parse(doc, p, err);

  json_decref(doc);
  return rc;
}

static void must_parse(const char *s, fo_prefs *p) {
  fo_prefs_error err;
  int rc = parse_str(s, p, &err);

  if (rc != FO_OK) {
    fail_msg("parse failed (%d) field \"%s\": %s\ninput: %.300s", rc,
             err.field, err.message, s);
  }
}

/* Field by field, because the struct has padding and pointers. */
static void assert_prefs_equal(const fo_prefs *a, const fo_prefs *b) {
  assert_int_equal(a->channels_on, b->channels_on);
  assert_int_equal(a->ncategories, b->ncategories);
  for (size_t i = 0; i < a->ncategories; i++) {
    assert_string_equal(a->categories[i].name, b->categories[i].name);
    assert_int_equal(a->categories[i].set, b->categories[i].set);
    assert_int_equal(a->categories[i].on & a->categories[i].set,
                     b->categories[i].on & b->categories[i].set);
  }
  assert_int_equal(a->quiet.enabled, b->quiet.enabled);
  if (a->quiet.enabled) {
    assert_int_equal(a->quiet.start_min, b->quiet.start_min);
    assert_int_equal(a->quiet.end_min, b->quiet.end_min);
    assert_string_equal(a->quiet.timezone, b->quiet.timezone);
    assert_int_equal(a->quiet.channels, b->quiet.channels);
  }
  for (int ch = 0; ch < FO_CH_COUNT; ch++) {
    assert_int_equal(a->caps[ch].per, b->caps[ch].per);
    if (a->caps[ch].per != FO_CAP_NONE) {
      assert_int_equal(a->caps[ch].limit, b->caps[ch].limit);
    }
  }
}

static void assert_is_default(const fo_prefs *p) {
  assert_int_equal(p->channels_on, ALL);
  assert_int_equal(p->ncategories, 0);
  assert_null(p->categories);
  assert_false(p->quiet.enabled);
  for (int ch = 0; ch < FO_CH_COUNT; ch++) {
    assert_int_equal(p->caps[ch].per, FO_CAP_NONE);
  }
}

static void test_defaults(void **state) {
  fo_prefs p;
  fo_prefs_error err;

  (void)state;
  memset(&p, 0x5a, sizeof(p));
  fo_prefs_init_default(&p);
  assert_is_default(&p);
  for (int ch = 0; ch < FO_CH_COUNT; ch++) {
    assert_true(fo_prefs_allows(&p, "anything", (fo_channel_kind)ch));
    assert_true(fo_prefs_allows(&p, NULL, (fo_channel_kind)ch));
  }
  fo_prefs_clear(&p);
  assert_is_default(&p);

  /* An empty document, and one with every member null, mean defaults;
   * a successful parse clears the error. */
  memset(&err, 0x5a, sizeof(err));
  assert_int_equal(parse_str("{}", &p, &err), FO_OK);
  assert_is_default(&p);
  assert_string_equal(err.field, "");
  assert_string_equal(err.message, "");
  fo_prefs_clear(&p);

  must_parse("{\"channels\": null, \"categories\": null,"
             " \"quiet_hours\": null, \"caps\": null}", &p);
  assert_is_default(&p);
  fo_prefs_clear(&p);

  must_parse("{\"channels\": {}, \"categories\": {}, \"caps\": {}}", &p);
  assert_is_default(&p);
  fo_prefs_clear(&p);

  /* A NULL error pointer is allowed. */
  assert_int_equal(parse_str("{}", &p, NULL), FO_OK);
  fo_prefs_clear(&p);
  assert_int_equal(parse_str("[]", &p, NULL), FO_EINVAL);
}

static void test_example(void **state) {
  fo_prefs p;

  (void)state;
  must_parse(example, &p);
  assert_int_equal(p.channels_on, ALL & ~BIT(FO_CH_SMS));
  assert_int_equal(p.ncategories, 1);
  assert_string_equal(p.categories[0].name, "marketing");
  assert_int_equal(p.categories[0].set, BIT(FO_CH_EMAIL) | BIT(FO_CH_PUSH));
  assert_int_equal(p.categories[0].on & p.categories[0].set, 0);
  assert_true(p.quiet.enabled);
  assert_int_equal(p.quiet.start_min, 22 * 60);
  assert_int_equal(p.quiet.end_min, 7 * 60);
  assert_string_equal(p.quiet.timezone, "Europe/Paris");
  assert_int_equal(p.quiet.channels, BIT(FO_CH_PUSH) | BIT(FO_CH_SMS));
  assert_int_equal(p.caps[FO_CH_PUSH].per, FO_CAP_HOUR);
  assert_int_equal(p.caps[FO_CH_PUSH].limit, 10);
  assert_int_equal(p.caps[FO_CH_SMS].per, FO_CAP_DAY);
  assert_int_equal(p.caps[FO_CH_SMS].limit, 3);
  assert_int_equal(p.caps[FO_CH_EMAIL].per, FO_CAP_NONE);
  assert_int_equal(p.caps[FO_CH_INAPP].per, FO_CAP_NONE);
  fo_prefs_clear(&p);
}

static void test_quiet_defaults_and_edges(void **state) {
  fo_prefs p;

  (void)state;
  must_parse("{\"quiet_hours\": {\"start\": \"00:00\", \"end\": \"23:59\"}}",
             &p);
  assert_true(p.quiet.enabled);
  assert_int_equal(p.quiet.start_min, 0);
  assert_int_equal(p.quiet.end_min, 23 * 60 + 59);
  assert_string_equal(p.quiet.timezone, "");
  assert_int_equal(p.quiet.channels, BIT(FO_CH_PUSH) | BIT(FO_CH_SMS));
  fo_prefs_clear(&p);

  must_parse("{\"quiet_hours\": {\"start\": \"23:59\", \"end\": \"00:00\","
             " \"timezone\": null, \"channels\": [\"email\", \"email\","
             " \"inapp\"]}}", &p);
  assert_int_equal(p.quiet.start_min, 23 * 60 + 59);
  assert_int_equal(p.quiet.end_min, 0);
  assert_int_equal(p.quiet.channels, BIT(FO_CH_EMAIL) | BIT(FO_CH_INAPP));
  fo_prefs_clear(&p);

  must_parse("{\"quiet_hours\": {\"start\": \"12:34\", \"end\": \"19:05\","
             " \"timezone\": \"UTC\"}}", &p);
  assert_int_equal(p.quiet.start_min, 12 * 60 + 34);
  assert_int_equal(p.quiet.end_min, 19 * 60 + 5);
  assert_string_equal(p.quiet.timezone, "UTC");
  fo_prefs_clear(&p);

  must_parse("{\"caps\": {\"email\": {\"limit\": 1, \"per\": \"minute\"},"
             " \"inapp\": {\"per\": \"day\", \"limit\": 1000000},"
             " \"push\": null}}", &p);
  assert_int_equal(p.caps[FO_CH_EMAIL].per, FO_CAP_MINUTE);
  assert_int_equal(p.caps[FO_CH_EMAIL].limit, 1);
  assert_int_equal(p.caps[FO_CH_INAPP].per, FO_CAP_DAY);
  assert_int_equal(p.caps[FO_CH_INAPP].limit, 1000000);
  assert_int_equal(p.caps[FO_CH_PUSH].per, FO_CAP_NONE);
  fo_prefs_clear(&p);
}

struct refusal {
  const char *doc;
  const char *field;
};

static const struct refusal refusals[] = {
  { "[]", "" },
  { "\"prefs\"", "" },
  { "{\"colour\": 1}", "colour" },
  { "{\"channels\": {}, \"quiet\": {}}", "quiet" },
  { "{\"channels\": []}", "channels" },
  { "{\"channels\": true}", "channels" },
  { "{\"channels\": {\"fax\": true}}", "channels.fax" },
  { "{\"channels\": {\"Push\": true}}", "channels.Push" },
  { "{\"channels\": {\"push\": 1}}", "channels.push" },
  { "{\"channels\": {\"sms\": \"no\"}}", "channels.sms" },
  { "{\"categories\": []}", "categories" },
  { "{\"categories\": {\"Marketing\": {}}}", "categories.Marketing" },
  { "{\"categories\": {\"\": {}}}", "categories." },
  { "{\"categories\": {\"a b\": {}}}", "categories.a b" },
  { "{\"categories\": {\"a/b\": {}}}", "categories.a/b" },
  { "{\"categories\": {\"marketing\": true}}", "categories.marketing" },
  { "{\"categories\": {\"marketing\": [\"email\"]}}",
    "categories.marketing" },
  { "{\"categories\": {\"ok\": {}, \"marketing\": {\"fax\": false}}}",
    "categories.marketing.fax" },
  { "{\"categories\": {\"marketing\": {\"email\": 0}}}",
    "categories.marketing.email" },
  { "{\"quiet_hours\": \"22:00-07:00\"}", "quiet_hours" },
  { "{\"quiet_hours\": {}}", "quiet_hours.start" },
  { "{\"quiet_hours\": {\"end\": \"07:00\"}}", "quiet_hours.start" },
  { "{\"quiet_hours\": {\"start\": \"22:00\"}}", "quiet_hours.end" },
  { "{\"quiet_hours\": {\"start\": \"22:00\", \"end\": null}}",
    "quiet_hours.end" },
  { "{\"quiet_hours\": {\"start\": \"24:00\", \"end\": \"07:00\"}}",
    "quiet_hours.start" },
  { "{\"quiet_hours\": {\"start\": \"7:00\", \"end\": \"08:00\"}}",
    "quiet_hours.start" },
  { "{\"quiet_hours\": {\"start\": \"07:0\", \"end\": \"08:00\"}}",
    "quiet_hours.start" },
  { "{\"quiet_hours\": {\"start\": \"07:60\", \"end\": \"08:00\"}}",
    "quiet_hours.start" },
  { "{\"quiet_hours\": {\"start\": \"0700\", \"end\": \"08:00\"}}",
    "quiet_hours.start" },
  { "{\"quiet_hours\": {\"start\": \"07:00:00\", \"end\": \"08:00\"}}",
    "quiet_hours.start" },
  { "{\"quiet_hours\": {\"start\": \" 7:00\", \"end\": \"08:00\"}}",
    "quiet_hours.start" },
  { "{\"quiet_hours\": {\"start\": \"07-00\", \"end\": \"08:00\"}}",
    "quiet_hours.start" },
  { "{\"quiet_hours\": {\"start\": \"3a:00\", \"end\": \"08:00\"}}",
    "quiet_hours.start" },
  { "{\"quiet_hours\": {\"start\": 2200, \"end\": \"08:00\"}}",
    "quiet_hours.start" },
  { "{\"quiet_hours\": {\"start\": \"22:00\", \"end\": \"29:00\"}}",
    "quiet_hours.end" },
  { "{\"quiet_hours\": {\"start\": \"22:00\", \"end\": \"07:5\\u0000\"}}",
    "quiet_hours.end" },
  { "{\"quiet_hours\": {\"start\": \"22:00\", \"end\": \"22:00\"}}",
    "quiet_hours.end" },
  { "{\"quiet_hours\": {\"start\": \"22:00\", \"end\": \"07:00\","
    " \"timezone\": \"Mars/Olympus\"}}", "quiet_hours.timezone" },
  { "{\"quiet_hours\": {\"start\": \"22:00\", \"end\": \"07:00\","
    " \"timezone\": \"europe/paris\"}}", "quiet_hours.timezone" },
  { "{\"quiet_hours\": {\"start\": \"22:00\", \"end\": \"07:00\","
    " \"timezone\": \"Etc/Unknown\"}}", "quiet_hours.timezone" },
  { "{\"quiet_hours\": {\"start\": \"22:00\", \"end\": \"07:00\","
    " \"timezone\": \"GMT+05:00\"}}", "quiet_hours.timezone" },
  { "{\"quiet_hours\": {\"start\": \"22:00\", \"end\": \"07:00\","
    " \"timezone\": \"\"}}", "quiet_hours.timezone" },
  { "{\"quiet_hours\": {\"start\": \"22:00\", \"end\": \"07:00\","
    " \"timezone\": 1}}", "quiet_hours.timezone" },
  { "{\"quiet_hours\": {\"start\": \"22:00\", \"end\": \"07:00\","
    " \"timezone\": \"America/Argentina/Buenos_Aires/America/Argentina/"
    "Buenos_Aires\"}}", "quiet_hours.timezone" },
  { "{\"quiet_hours\": {\"start\": \"22:00\", \"end\": \"07:00\","
    " \"channels\": [\"push\", \"fax\"]}}", "quiet_hours.channels" },
  { "{\"quiet_hours\": {\"start\": \"22:00\", \"end\": \"07:00\","
    " \"channels\": []}}", "quiet_hours.channels" },
  { "{\"quiet_hours\": {\"start\": \"22:00\", \"end\": \"07:00\","
    " \"channels\": \"push\"}}", "quiet_hours.channels" },
  { "{\"quiet_hours\": {\"start\": \"22:00\", \"end\": \"07:00\","
    " \"channels\": [null]}}", "quiet_hours.channels" },
  { "{\"quiet_hours\": {\"start\": \"22:00\", \"end\": \"07:00\","
    " \"days\": [1]}}", "quiet_hours.days" },
  { "{\"caps\": []}", "caps" },
  { "{\"caps\": {\"fax\": {\"limit\": 1, \"per\": \"day\"}}}", "caps.fax" },
  { "{\"caps\": {\"push\": 10}}", "caps.push" },
  { "{\"caps\": {\"push\": {\"per\": \"day\"}}}", "caps.push.limit" },
  { "{\"caps\": {\"push\": {\"limit\": 0, \"per\": \"day\"}}}",
    "caps.push.limit" },
  { "{\"caps\": {\"push\": {\"limit\": -3, \"per\": \"day\"}}}",
    "caps.push.limit" },
  { "{\"caps\": {\"push\": {\"limit\": 1.5, \"per\": \"day\"}}}",
    "caps.push.limit" },
  { "{\"caps\": {\"push\": {\"limit\": 10.0, \"per\": \"day\"}}}",
    "caps.push.limit" },
  { "{\"caps\": {\"push\": {\"limit\": \"10\", \"per\": \"day\"}}}",
    "caps.push.limit" },
  { "{\"caps\": {\"push\": {\"limit\": 1000001, \"per\": \"day\"}}}",
    "caps.push.limit" },
  { "{\"caps\": {\"sms\": {\"limit\": 4294967297, \"per\": \"day\"}}}",
    "caps.sms.limit" },
  { "{\"caps\": {\"push\": {\"limit\": 10}}}", "caps.push.per" },
  { "{\"caps\": {\"push\": {\"limit\": 10, \"per\": \"week\"}}}",
    "caps.push.per" },
  { "{\"caps\": {\"push\": {\"limit\": 10, \"per\": \"Hour\"}}}",
    "caps.push.per" },
  { "{\"caps\": {\"email\": {\"limit\": 10, \"per\": 60}}}",
    "caps.email.per" },
  { "{\"caps\": {\"push\": {\"limit\": 10, \"per\": \"hour\","
    " \"burst\": 2}}}", "caps.push.burst" },
};

/* A message is one line of printable ASCII that names its field. */
static void check_message(const fo_prefs_error *err) {
  size_t len = strnlen(err->message, sizeof(err->message));

  assert_true(len > 0);
  assert_true(len < sizeof(err->message));
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)err->message[i];

    assert_true(c >= 0x20 && c < 0x7f);
  }
  for (const char *f = err->field; *f; f++) {
    assert_true((unsigned char)*f >= 0x20 && (unsigned char)*f < 0x7f);
  }
  if (err->field[0] != '\0') {
    char quoted[sizeof(err->field) + 2];

    snprintf(quoted, sizeof(quoted), "\"%s\"", err->field);
    if (!strstr(err->message, quoted)) {
      fail_msg("message does not name %s: %s", quoted, err->message);
    }
  }
}

static void expect_refusal(const char *doc, const char *field) {
  fo_prefs p;
  fo_prefs_error err;
  int rc;

  memset(&p, 0x5a, sizeof(p));
  memset(&err, 0, sizeof(err));
  rc = parse_str(doc, &p, &err);
  if (rc != FO_EINVAL || strcmp(err.field, field) != 0) {
    fail_msg("input %.300s\nwant FO_EINVAL field \"%s\"\n"
             "got  rc %d field \"%s\": %s", doc, field, rc, err.field,
             err.message);
  }
  check_message(&err);

  /* The out-parameter is left alone on failure. */
  for (size_t i = 0; i < sizeof(p); i++) {
    assert_int_equal(((unsigned char *)&p)[i], 0x5a);
  }
}

static void test_refusals(void **state) {
  (void)state;
  for (size_t i = 0; i < sizeof(refusals) / sizeof(refusals[0]); i++) {
    expect_refusal(refusals[i].doc, refusals[i].field);
  }
}

static void test_refusal_edges(void **state) {
  char doc[512];
  char field[128];
  char name[80];
  fo_prefs p;
  fo_prefs_error err;

  (void)state;

  /* Category names: 64 characters is the most. */
  memset(name, 'a', 64);
  name[64] = '\0';
  snprintf(doc, sizeof(doc), "{\"categories\": {\"%s\": {}}}", name);
  must_parse(doc, &p);
  assert_string_equal(p.categories[0].name, name);
  fo_prefs_clear(&p);

  name[64] = 'a';
  name[65] = '\0';
  snprintf(doc, sizeof(doc), "{\"categories\": {\"%s\": {}}}", name);
  snprintf(field, sizeof(field), "categories.%s", name);
  expect_refusal(doc, field);

  must_parse("{\"categories\": {\"a.b-c_9\": {\"sms\": false}}}", &p);
  fo_prefs_clear(&p);

  /* Keys with a NUL byte (which only a program can build, the parser
   * refuses them) or outside ASCII are refused, and the field comes back
   * as printable ASCII. */
  {
    json_t *nul_doc = load("{\"channels\": {}, \"categories\": {}}");
    json_t *chans = json_object_get(nul_doc, "channels");
    json_t *cats = json_object_get(nul_doc, "categories");

    assert_int_equal(json_object_setn_new(chans, "push\0x", 6,
                                          json_true()), 0);
    assert_int_equal(fo_prefs_parse(nul_doc, &p, &err), FO_EINVAL);
    assert_string_equal(err.field, "channels.push");
    check_message(&err);
    assert_int_equal(json_object_deln(chans, "push\0x", 6), 0);
    assert_int_equal(json_object_setn_new(cats, "mk\0", 3, json_object()),
                     0);
    assert_int_equal(fo_prefs_parse(nul_doc, &p, &err), FO_EINVAL);
    assert_string_equal(err.field, "categories.mk");
    check_message(&err);
    json_decref(nul_doc);
  }
  assert_int_equal(parse_str("{\"channels\": {\"p\\u00fcsh\": true}}",
                             &p, &err), FO_EINVAL);
  check_message(&err);
  assert_string_equal(err.field, "channels.p??sh");
  assert_int_equal(parse_str("{\"quiet_hours\": {\"start\": \"22:00\","
                             " \"end\": \"07:00\", \"channels\":"
                             " [\"push\\u0000\"]}}", &p, &err), FO_EINVAL);
  assert_string_equal(err.field, "quiet_hours.channels");

  /* A very long unknown key is cut to fit, still naming the field. */
  {
    char *big = malloc(2100);
    size_t off;

    assert_non_null(big);
    off = (size_t)snprintf(big, 2100, "{\"");
    memset(big + off, 'k', 2000);
    snprintf(big + off + 2000, 100, "\": 1}");
    assert_int_equal(parse_str(big, &p, &err), FO_EINVAL);
    assert_int_equal(strlen(err.field), sizeof(err.field) - 1);
    assert_true(strspn(err.field, "k") == sizeof(err.field) - 1);
    free(big);
  }
}

static void test_too_many_categories(void **state) {
  size_t cap = 1100 * 24 + 64;
  char *doc = malloc(cap);
  size_t off;
  fo_prefs p;

  (void)state;
  assert_non_null(doc);
  for (int n = 1000; n <= 1001; n++) {
    off = (size_t)snprintf(doc, cap, "{\"categories\": {");
    for (int i = 0; i < n; i++) {
      off += (size_t)snprintf(doc + off, cap - off, "%s\"c%d\": {}",
                              i ? "," : "", i);
    }
    snprintf(doc + off, cap - off, "}}");
    if (n == 1000) {
      must_parse(doc, &p);
      assert_int_equal(p.ncategories, 1000);
      fo_prefs_clear(&p);
    } else {
      expect_refusal(doc, "categories");
    }
  }
  free(doc);
}

static void test_allows(void **state) {
  fo_prefs p;

  (void)state;
  must_parse("{\"channels\": {\"sms\": false, \"email\": true},"
             " \"categories\": {"
             "   \"marketing\": {\"email\": false, \"sms\": true},"
             "   \"security\": {\"push\": true},"
             "   \"digest\": {\"push\": false, \"inapp\": null},"
             "   \"empty\": {}}}", &p);

  /* The category's own switch wins, both ways. */
  assert_false(fo_prefs_allows(&p, "marketing", FO_CH_EMAIL));
  assert_true(fo_prefs_allows(&p, "marketing", FO_CH_SMS));
  assert_false(fo_prefs_allows(&p, "digest", FO_CH_PUSH));
  assert_true(fo_prefs_allows(&p, "security", FO_CH_PUSH));

  /* Channels the category does not name fall back to the switch. */
  assert_true(fo_prefs_allows(&p, "marketing", FO_CH_PUSH));
  assert_true(fo_prefs_allows(&p, "marketing", FO_CH_INAPP));
  assert_false(fo_prefs_allows(&p, "security", FO_CH_SMS));
  assert_true(fo_prefs_allows(&p, "digest", FO_CH_INAPP));
  assert_false(fo_prefs_allows(&p, "empty", FO_CH_SMS));
  assert_true(fo_prefs_allows(&p, "empty", FO_CH_EMAIL));

  /* Unknown categories, no category, prefixes of names. */
  assert_false(fo_prefs_allows(&p, "order_update", FO_CH_SMS));
  assert_true(fo_prefs_allows(&p, "order_update", FO_CH_EMAIL));
  assert_false(fo_prefs_allows(&p, NULL, FO_CH_SMS));
  assert_true(fo_prefs_allows(&p, "market", FO_CH_EMAIL));
  assert_true(fo_prefs_allows(&p, "marketingx", FO_CH_EMAIL));

  /* Not a channel: never allowed. No preferences: the defaults. */
  assert_false(fo_prefs_allows(&p, "security", (fo_channel_kind)7));
  assert_true(fo_prefs_allows(NULL, "marketing", FO_CH_EMAIL));
  fo_prefs_clear(&p);
}

/* Categories come in any order and are found by binary search. */
static void test_allows_many_categories(void **state) {
  size_t cap = 300 * 48 + 64;
  char *doc = malloc(cap);
  size_t off;
  fo_prefs p;

  (void)state;
  assert_non_null(doc);
  off = (size_t)snprintf(doc, cap, "{\"channels\": {\"push\": false},"
                         " \"categories\": {");
  for (int i = 299; i >= 0; i--) {
    off += (size_t)snprintf(doc + off, cap - off, "%s\"c%03d\": "
                            "{\"push\": %s}", i == 299 ? "" : ",",
                            (i * 7) % 300, i % 3 ? "true" : "false");
  }
  snprintf(doc + off, cap - off, "}}");
  must_parse(doc, &p);
  assert_int_equal(p.ncategories, 300);
  for (size_t i = 1; i < p.ncategories; i++) {
    assert_true(strcmp(p.categories[i - 1].name, p.categories[i].name) < 0);
  }
  for (int i = 0; i < 300; i++) {
    char name[8];

    snprintf(name, sizeof(name), "c%03d", (i * 7) % 300);
    assert_int_equal(fo_prefs_allows(&p, name, FO_CH_PUSH), i % 3 != 0);
    assert_true(fo_prefs_allows(&p, name, FO_CH_EMAIL));
  }
  assert_false(fo_prefs_allows(&p, "c300", FO_CH_PUSH));
  assert_false(fo_prefs_allows(&p, "a", FO_CH_PUSH));
  assert_false(fo_prefs_allows(&p, "z", FO_CH_PUSH));
  fo_prefs_clear(&p);
  free(doc);
}

static void expect_json(json_t *got, const char *want_s) {
  json_t *want = load(want_s);

  if (!json_equal(got, want)) {
    char *g = json_dumps(got, JSON_SORT_KEYS | JSON_ENCODE_ANY);

    fail_msg("want %s\ngot  %s", want_s, g ? g : "(null)");
  }
  json_decref(want);
}

static void test_to_json(void **state) {
  fo_prefs p;
  json_t *doc;

  (void)state;
  fo_prefs_init_default(&p);
  doc = fo_prefs_to_json(&p);
  expect_json(doc, "{\"channels\": {\"push\": true, \"email\": true,"
              " \"sms\": true, \"inapp\": true}, \"categories\": {},"
              " \"caps\": {}}");
  json_decref(doc);

  must_parse(example, &p);
  doc = fo_prefs_to_json(&p);
  expect_json(doc, example);
  json_decref(doc);
  fo_prefs_clear(&p);

  /* Defaults become explicit, except a window's time zone, which stays
   * the user's when not given. */
  must_parse("{\"channels\": {\"email\": false},"
             " \"quiet_hours\": {\"start\": \"09:05\", \"end\": \"17:30\"},"
             " \"categories\": {\"b\": {\"inapp\": true}, \"a\": {}}}", &p);
  doc = fo_prefs_to_json(&p);
  expect_json(doc, "{\"channels\": {\"push\": true, \"email\": false,"
              " \"sms\": true, \"inapp\": true},"
              " \"categories\": {\"a\": {}, \"b\": {\"inapp\": true}},"
              " \"quiet_hours\": {\"start\": \"09:05\", \"end\": \"17:30\","
              " \"channels\": [\"push\", \"sms\"]},"
              " \"caps\": {}}");
  json_decref(doc);
  fo_prefs_clear(&p);
}

static const char *const round_trip_docs[] = {
  "{}",
  example,
  "{\"channels\": {\"push\": false, \"email\": false, \"sms\": false,"
  " \"inapp\": false}}",
  "{\"categories\": {\"z\": {\"push\": true, \"email\": false,"
  " \"sms\": true, \"inapp\": false}, \"a.b\": {\"sms\": false},"
  " \"m\": {}}}",
  "{\"quiet_hours\": {\"start\": \"00:00\", \"end\": \"00:01\","
  " \"channels\": [\"inapp\", \"email\", \"push\", \"sms\"]}}",
  "{\"quiet_hours\": {\"start\": \"23:59\", \"end\": \"00:00\","
  " \"timezone\": \"America/New_York\", \"channels\": [\"email\"]}}",
  "{\"caps\": {\"push\": {\"limit\": 1, \"per\": \"minute\"},"
  " \"email\": {\"limit\": 1000000, \"per\": \"day\"},"
  " \"sms\": {\"limit\": 7, \"per\": \"hour\"},"
  " \"inapp\": {\"limit\": 99, \"per\": \"minute\"}}}",
};

static void test_round_trip(void **state) {
  (void)state;
  for (size_t i = 0; i < sizeof(round_trip_docs) / sizeof(char *); i++) {
    fo_prefs a;
    fo_prefs b;
    json_t *doc;
    json_t *again;

    must_parse(round_trip_docs[i], &a);
    doc = fo_prefs_to_json(&a);
    assert_non_null(doc);
    assert_int_equal(fo_prefs_parse(doc, &b, NULL), FO_OK);
    assert_prefs_equal(&a, &b);

    /* The canonical form is a fixed point. */
    again = fo_prefs_to_json(&b);
    assert_true(json_equal(doc, again));
    json_decref(again);
    json_decref(doc);
    fo_prefs_clear(&a);
    fo_prefs_clear(&b);
  }
}

/* RFC 7396, appendix A: every example, in order. */
static const char *const rfc_examples[][3] = {
  { "{\"a\":\"b\"}", "{\"a\":\"c\"}", "{\"a\":\"c\"}" },
  { "{\"a\":\"b\"}", "{\"b\":\"c\"}", "{\"a\":\"b\",\"b\":\"c\"}" },
  { "{\"a\":\"b\"}", "{\"a\":null}", "{}" },
  { "{\"a\":\"b\",\"b\":\"c\"}", "{\"a\":null}", "{\"b\":\"c\"}" },
  { "{\"a\":[\"b\"]}", "{\"a\":\"c\"}", "{\"a\":\"c\"}" },
  { "{\"a\":\"c\"}", "{\"a\":[\"b\"]}", "{\"a\":[\"b\"]}" },
  { "{\"a\":{\"b\":\"c\"}}", "{\"a\":{\"b\":\"d\",\"c\":null}}",
    "{\"a\":{\"b\":\"d\"}}" },
  { "{\"a\":[{\"b\":\"c\"}]}", "{\"a\":[1]}", "{\"a\":[1]}" },
  { "[\"a\",\"b\"]", "[\"c\",\"d\"]", "[\"c\",\"d\"]" },
  { "{\"a\":\"b\"}", "[\"c\"]", "[\"c\"]" },
  { "{\"a\":\"foo\"}", "null", "null" },
  { "{\"a\":\"foo\"}", "\"bar\"", "\"bar\"" },
  { "{\"e\":null}", "{\"a\":1}", "{\"e\":null,\"a\":1}" },
  { "[1,2]", "{\"a\":\"b\",\"c\":null}", "{\"a\":\"b\"}" },
  { "{}", "{\"a\":{\"bb\":{\"ccc\":null}}}", "{\"a\":{\"bb\":{}}}" },
};

static void test_merge_patch_rfc(void **state) {
  (void)state;
  for (size_t i = 0; i < sizeof(rfc_examples) / sizeof(rfc_examples[0]);
       i++) {
    json_t *target = load(rfc_examples[i][0]);
    json_t *patch = load(rfc_examples[i][1]);
    json_t *patch_copy = json_deep_copy(patch);
    json_t *got = fo_json_merge_patch(target, patch);

    assert_non_null(got);
    expect_json(got, rfc_examples[i][2]);
    /* The patch is read only. */
    assert_true(json_equal(patch, patch_copy));
    json_decref(got);
    json_decref(patch);
    json_decref(patch_copy);
  }
}

/* RFC 7396, section 3, and a patch whose values are not shared. */
static void test_merge_patch_more(void **state) {
  json_t *target;
  json_t *patch;
  json_t *got;

  (void)state;
  target = load("{\"title\": \"Goodbye!\", \"author\": {\"givenName\":"
                " \"John\", \"familyName\": \"Doe\"}, \"tags\": [\"example\","
                " \"sample\"], \"content\": \"This will be unchanged\"}");
  patch = load("{\"title\": \"Hello!\", \"phoneNumber\": \"+01-123-456-7890\","
               " \"author\": {\"familyName\": null}, \"tags\": [\"example\"]}");
  got = fo_json_merge_patch(target, patch);
  expect_json(got, "{\"title\": \"Hello!\", \"author\": {\"givenName\":"
              " \"John\"}, \"tags\": [\"example\"], \"content\": \"This will"
              " be unchanged\", \"phoneNumber\": \"+01-123-456-7890\"}");

  /* Changing the result leaves the patch as it was. */
  json_array_append_new(json_object_get(got, "tags"), json_string("x"));
  assert_int_equal(json_array_size(json_object_get(patch, "tags")), 1);
  json_decref(got);
  json_decref(patch);

  /* No target at all is an empty one. */
  patch = load("{\"a\": {\"b\": null, \"c\": 1}}");
  got = fo_json_merge_patch(NULL, patch);
  expect_json(got, "{\"a\": {\"c\": 1}}");
  json_decref(got);
  json_decref(patch);

  /* The example of docs/preferences.md, applied both to the document as
   * sent and to its canonical form: the same preferences either way. */
  for (int canonical = 0; canonical < 2; canonical++) {
    fo_prefs p;
    json_t *stored = load(example);
    json_t *shown;

    if (canonical) {
      assert_int_equal(fo_prefs_parse(stored, &p, NULL), FO_OK);
      json_decref(stored);
      stored = fo_prefs_to_json(&p);
      fo_prefs_clear(&p);
    }
    patch = load("{\"channels\": {\"sms\": false},"
                 " \"quiet_hours\": {\"end\": \"08:00\"},"
                 " \"caps\": {\"push\": null},"
                 " \"categories\": {\"marketing\": null,"
                 " \"digest\": {\"email\": false}}}");
    got = fo_json_merge_patch(stored, patch);
    assert_int_equal(fo_prefs_parse(got, &p, NULL), FO_OK);
    shown = fo_prefs_to_json(&p);
    expect_json(shown, "{\"channels\": {\"push\": true, \"email\": true,"
                " \"sms\": false, \"inapp\": true},"
                " \"categories\": {\"digest\": {\"email\": false}},"
                " \"quiet_hours\": {\"start\": \"22:00\", \"end\": \"08:00\","
                " \"timezone\": \"Europe/Paris\","
                " \"channels\": [\"push\", \"sms\"]},"
                " \"caps\": {\"sms\": {\"limit\": 3, \"per\": \"day\"}}}");
    json_decref(shown);
    fo_prefs_clear(&p);
    json_decref(got);
    json_decref(patch);
  }

  /* Patching in a window without a start leaves a document that is
   * refused, naming the start. */
  {
    fo_prefs p;
    fo_prefs_error err;

    patch = load("{\"quiet_hours\": {\"end\": \"08:00\"}}");
    got = fo_json_merge_patch(load("{\"quiet_hours\": null}"), patch);
    assert_int_equal(fo_prefs_parse(got, &p, &err), FO_EINVAL);
    assert_string_equal(err.field, "quiet_hours.start");
    json_decref(got);
    json_decref(patch);
  }
}

static void test_tz_valid(void **state) {
  static const char *const good[] = {
    "UTC", "Etc/UTC", "GMT", "Europe/Paris", "America/New_York",
    "Asia/Kolkata", "Australia/Lord_Howe", "America/Argentina/Buenos_Aires",
    "Etc/GMT+5", "Etc/GMT-14", "US/Eastern", "Europe/Kiev", "Pacific/Apia",
  };
  static const char *const bad[] = {
    "", "Mars/Olympus", "Etc/Unknown", "europe/paris", "utc", "GMT+05:00",
    "GMT+5", "Europe/Paris ", " UTC", "Europe/Paris\n", "Europe/Par\xc3\xads",
    "Europe/Paris/", "../etc/passwd", "Z", "+01:00",
    "Europe/Paris_Europe/Paris_Europe/Paris_Europe/Paris_Europe/Paris",
  };

  (void)state;
  for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
    if (!fo_tz_valid(good[i])) {
      fail_msg("refused %s", good[i]);
    }
  }
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    if (fo_tz_valid(bad[i])) {
      fail_msg("accepted \"%s\"", bad[i]);
    }
  }
  assert_false(fo_tz_valid(NULL));
}

/* Fails the allocation numbered fail_at (from 0), counting all of them. */
static long alloc_count;
static long alloc_fail_at = -1;

static void *counting_malloc(size_t size) {
  if (alloc_count++ == alloc_fail_at) {
    return NULL;
  }
  return malloc(size);
}

static void test_allocation_failures(void **state) {
  json_t *doc = load(example);
  json_t *patch = load("{\"channels\": {\"sms\": null, \"fax\": true},"
                       " \"x\": {\"y\": {\"z\": [1, 2]}}}");
  json_t *want_patched;
  fo_prefs p;
  fo_prefs ref;
  long total;
  int nomem = 0;

  (void)state;
  want_patched = fo_json_merge_patch(json_deep_copy(doc), patch);
  assert_non_null(want_patched);
  must_parse(example, &ref);
  json_set_alloc_funcs(counting_malloc, free);

  /* Parsing: one allocation after another fails, then none does. */
  alloc_count = 0;
  alloc_fail_at = -1;
  assert_int_equal(fo_prefs_parse(doc, &p, NULL), FO_OK);
  fo_prefs_clear(&p);
  total = alloc_count;
  assert_true(total >= 2);
  for (alloc_fail_at = 0; alloc_fail_at < total; alloc_fail_at++) {
    alloc_count = 0;
    assert_int_equal(fo_prefs_parse(doc, &p, NULL), FO_ENOMEM);
  }

  /* The canonical document: NULL or complete. */
  alloc_count = 0;
  alloc_fail_at = -1;
  json_decref(fo_prefs_to_json(&ref));
  total = alloc_count;
  for (alloc_fail_at = 0; alloc_fail_at < total; alloc_fail_at++) {
    json_t *out;

    alloc_count = 0;
    out = fo_prefs_to_json(&ref);
    assert_null(out);
  }

  /* The merge patch: NULL (target consumed) or the right result. */
  alloc_fail_at = -1;
  alloc_count = 0;
  json_decref(fo_json_merge_patch(json_deep_copy(doc), patch));
  total = alloc_count;
  for (long at = 0; at < total; at++) {
    json_t *target;
    json_t *out;

    alloc_fail_at = -1;
    target = json_deep_copy(doc);
    assert_non_null(target);
    alloc_count = 0;
    alloc_fail_at = at;
    out = fo_json_merge_patch(target, patch);
    if (out) {
      assert_true(json_equal(out, want_patched));
      json_decref(out);
    } else {
      nomem++;
    }
  }
  assert_true(nomem > 0);

  json_set_alloc_funcs(malloc, free);
  fo_prefs_clear(&ref);
  json_decref(want_patched);
  json_decref(patch);
  json_decref(doc);
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_defaults),
    cmocka_unit_test(test_example),
    cmocka_unit_test(test_quiet_defaults_and_edges),
    cmocka_unit_test(test_refusals),
    cmocka_unit_test(test_refusal_edges),
    cmocka_unit_test(test_too_many_categories),
    cmocka_unit_test(test_allows),
    cmocka_unit_test(test_allows_many_categories),
    cmocka_unit_test(test_to_json),
    cmocka_unit_test(test_round_trip),
    cmocka_unit_test(test_merge_patch_rfc),
    cmocka_unit_test(test_merge_patch_more),
    cmocka_unit_test(test_tz_valid),
    cmocka_unit_test(test_allocation_failures),
  };

  return cmocka_run_group_tests(tests, NULL, NULL);
}
