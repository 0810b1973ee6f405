/* SPDX-License-Identifier: MIT */
/*
 * The Twilio wire pieces that need no network: E.164 checks, form
 * decoding and the X-Twilio-Signature of status callbacks, checked
 * against the worked example Twilio publishes.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <string.h>

#include "fanout/common.h"
#include "twilio.h"

/* Twilio's published example: token 12345, this URL and these
 * parameters sign to this value. */
#define EX_TOKEN "12345"
#define EX_URL "https://mycompany.com/myapp.php?foo=1&bar=2"
#define EX_SIG "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
/* Out of order on purpose: the signature sorts by name. */
#define EX_BODY                                                            \
  "To=%2B18005551212&CallSid=CA1234567890ABCDE&Digits=1234"                \
  "&From=%2B12349013030&Caller=%2B12349013030"

static void test_e164(void **state) {
  (void)state;
  assert_true(fo_twilio_e164("+15551234567"));
  assert_true(fo_twilio_e164("+3361234"));          /* 7 digits */
  assert_true(fo_twilio_e164("+123456789012345"));  /* 15 digits */
  assert_false(fo_twilio_e164("+1234567890123456"));
  assert_false(fo_twilio_e164("+123456"));
  assert_false(fo_twilio_e164("15551234567"));
  assert_false(fo_twilio_e164("+05551234567"));
  assert_false(fo_twilio_e164("+1555123456a"));
  assert_false(fo_twilio_e164("+1 555 123 4567"));
  assert_false(fo_twilio_e164(""));
  assert_false(fo_twilio_e164(NULL));
}

static void test_form_parse(void **state) {
  static const char body[] =
      "MessageSid=SM0123&MessageStatus=delivered&Empty=&Bare"
      "&Text=a+b%26c%3D%C3%A9&&Text=second";
  fo_twilio_form f;

  (void)state;
  assert_int_equal(fo_twilio_form_parse(body, strlen(body), &f), FO_OK);
  assert_int_equal(f.n, 6);
  assert_string_equal(fo_twilio_form_get(&f, "MessageSid"), "SM0123");
  assert_string_equal(fo_twilio_form_get(&f, "MessageStatus"), "delivered");
  assert_string_equal(fo_twilio_form_get(&f, "Empty"), "");
  assert_string_equal(fo_twilio_form_get(&f, "Bare"), "");
  /* The first of a repeated name. */
  assert_string_equal(fo_twilio_form_get(&f, "Text"), "a b&c=\xC3\xA9");
  assert_null(fo_twilio_form_get(&f, "ErrorCode"));
  fo_twilio_form_clear(&f);

  assert_int_equal(fo_twilio_form_parse("", 0, &f), FO_OK);
  assert_int_equal(f.n, 0);
  fo_twilio_form_clear(&f);
}

static void test_form_parse_refuses_bad_escapes(void **state) {
  static const char *const bad[] = {"a=%", "a=%4", "a=%zz", "a%2=1",
                                    "a=%00"};
  fo_twilio_form f = {0, NULL};

  (void)state;
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
    assert_int_equal(fo_twilio_form_parse(bad[i], strlen(bad[i]), &f),
                     FO_EINVAL);
  /* A NUL byte inside the body is refused too. */
  assert_int_equal(fo_twilio_form_parse("a=b\0c", 5, &f), FO_EINVAL);
}

static void test_signature_matches_published_example(void **state) {
  fo_twilio_form f;
  char sig[64];

  (void)state;
  assert_int_equal(fo_twilio_form_parse(EX_BODY, strlen(EX_BODY), &f),
                   FO_OK);
  assert_int_equal(fo_twilio_signature(EX_TOKEN, EX_URL, &f, sig,
                                       sizeof(sig)),
                   FO_OK);
  assert_string_equal(sig, EX_SIG);
  assert_true(fo_twilio_signature_ok(EX_TOKEN, EX_URL, &f, EX_SIG));
  assert_int_equal(fo_twilio_signature(EX_TOKEN, EX_URL, &f, sig, 20),
                   FO_EINVAL);
  fo_twilio_form_clear(&f);
}

static void test_signature_refuses_changes(void **state) {
  static const char tampered[] =
      "To=%2B18005551212&CallSid=CA1234567890ABCDE&Digits=9999"
      "&From=%2B12349013030&Caller=%2B12349013030";
  fo_twilio_form f, g;

  (void)state;
  assert_int_equal(fo_twilio_form_parse(EX_BODY, strlen(EX_BODY), &f),
                   FO_OK);
  assert_int_equal(fo_twilio_form_parse(tampered, strlen(tampered), &g),
                   FO_OK);
  assert_false(fo_twilio_signature_ok(EX_TOKEN, EX_URL, &g, EX_SIG));
  assert_false(fo_twilio_signature_ok("54321", EX_URL, &f, EX_SIG));
  assert_false(fo_twilio_signature_ok(
      EX_TOKEN, "https://mycompany.com/myapp.php?foo=1&bar=3", &f, EX_SIG));
  assert_false(fo_twilio_signature_ok(EX_TOKEN, EX_URL, &f, NULL));
  assert_false(fo_twilio_signature_ok(EX_TOKEN, EX_URL, &f, ""));
  assert_false(fo_twilio_signature_ok(EX_TOKEN, EX_URL, &f,
                                      "0/KCTR6DLpKmkAf8muzZqo1nDgQ"));
  assert_false(fo_twilio_signature_ok(EX_TOKEN, EX_URL, &f,
                                      "1/KCTR6DLpKmkAf8muzZqo1nDgQ="));
  fo_twilio_form_clear(&f);
  fo_twilio_form_clear(&g);
}

static void test_new_refuses_incomplete_config(void **state) {
  fo_twilio_conf c;
  fo_channel *ch = NULL;
  char err[256];

  (void)state;
  memset(&c, 0, sizeof(c));
  c.url = "https://api.twilio.example";
  c.account_sid = "AC0123";
  c.auth_token = "secret-token-value";
  assert_int_equal(fo_twilio_new(&c, &ch, err, sizeof(err)), FO_ECONFIG);
  assert_non_null(strstr(err, "from"));
  assert_null(strstr(err, "secret-token-value"));
  c.from = "5551234";
  assert_int_equal(fo_twilio_new(&c, &ch, err, sizeof(err)), FO_ECONFIG);
  assert_non_null(strstr(err, "E.164"));
  c.from = "+15551234567";
  c.auth_token = NULL;
  assert_int_equal(fo_twilio_new(&c, &ch, err, sizeof(err)), FO_ECONFIG);
  assert_non_null(strstr(err, "auth_token"));
  assert_null(ch);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_e164),
      cmocka_unit_test(test_form_parse),
      cmocka_unit_test(test_form_parse_refuses_bad_escapes),
      cmocka_unit_test(test_signature_matches_published_example),
      cmocka_unit_test(test_signature_refuses_changes),
      cmocka_unit_test(test_new_refuses_incomplete_config),
  };

  return cmocka_run_group_tests(tests, NULL, NULL);
}
