/* SPDX-License-Identifier: MIT */
/*
 * Configuration: an INI file, then FANOUT_<SECTION>_<KEY> environment
 * overrides, checked against the schema documented in docs/config.md.
 * Sections may be named instances (`[apns.NAME]`, `[fcm.NAME]`) where the
 * schema allows it.
 *
 * A loaded fo_config is immutable, so any thread may read it.
 */
#ifndef FO_CONFIG_H
#define FO_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct fo_config fo_config;

/*
 * Loads `path` (NULL: defaults and environment only), applies the
 * environment from `envp` (NULL-terminated "NAME=value" strings; NULL
 * means the process environment), fills defaults and validates.
 *
 * Returns FO_OK and sets *out (free with fo_config_free()), or
 * FO_ECONFIG and writes one line naming the file, section and key to
 * `err` (e.g. "config: [admin] listen: expected HOST:PORT, got \"x\""),
 * or FO_ENOMEM.
 */
int fo_config_load(const char *path, char *const *envp, fo_config **out,
                   char *err, size_t errlen);

void fo_config_free(fo_config *cfg);

/* True when the section was given (in the file or the environment). */
bool fo_config_has_section(const fo_config *cfg, const char *section);

/*
 * Value of a key, with the schema's default applied; NULL when the key
 * has no value and no default. The pointer lives as long as cfg.
 */
const char *fo_config_get(const fo_config *cfg, const char *section,
                          const char *key);

/* Integer and boolean views of a key the schema types as such. */
int64_t fo_config_get_int(const fo_config *cfg, const char *section,
                          const char *key);
bool fo_config_get_bool(const fo_config *cfg, const char *section,
                        const char *key);

/*
 * Names of the instances of a named section family, e.g. for "apns":
 * "default" when [apns] is present, then NAME for each [apns.NAME].
 * Returns how many there are; fills at most `cap` entries of `names`,
 * whose pointers live as long as cfg.
 */
size_t fo_config_instances(const fo_config *cfg, const char *family,
                           const char **names, size_t cap);

/* True when the schema marks the key as a secret (never logged). */
bool fo_config_is_secret(const char *section, const char *key);

#endif /* FO_CONFIG_H */
