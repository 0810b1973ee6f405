# fanout: build, test and run.
#
#   make            builds build/fanoutd and build/fanout-devbroker
#   make test       installs what is missing, starts the private services,
#                   builds with ASan+UBSan and runs every test
#   make run        builds and starts fanoutd with the embedded defaults
#   make bench      runs the benchmarks under bench/
#
# WERROR=0 turns warnings back into warnings; SANITIZE=0 builds the test
# tree without sanitizers (for valgrind).

CC      ?= cc
PKGS    := rdkafka jansson inih libpq hiredis libmicrohttpd icu-uc icu-i18n \
           libcrypto libcurl
WERROR  ?= 1
SANITIZE ?= 1

WARN    := -Wall -Wextra -Wstrict-prototypes -Wmissing-prototypes -Wshadow \
           -Wpointer-arith -Wformat=2 -Wno-format-nonliteral \
           -Wno-format-zero-length
ifeq ($(WERROR),1)
WARN    += -Werror
endif

PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null)

# Project headers are included with quotes and found through -iquote.
# A module must not be named like a system header (GCC's own <limits.h>
# would pick up prefs/limits.h through include_next).
CFLAGS_COMMON := -std=c11 -D_GNU_SOURCE -Iinclude -iquote engine \
                 -iquote channels -iquote prefs -iquote tests/support \
                 -iquote tests/fakes $(WARN) $(PKG_CFLAGS)
LIBS          := $(PKG_LIBS) -lpthread -lm
TEST_LIBS     := $(shell pkg-config --libs cmocka 2>/dev/null)

# Release tree.
B        := build
CFLAGS_R := $(CFLAGS_COMMON) -O2 -g -MMD -MP

# Test tree: the same sources under AddressSanitizer and UBSan.
T        := build/test
ifeq ($(SANITIZE),1)
SAN      := -fsanitize=address,undefined -fno-sanitize-recover=undefined \
            -fno-omit-frame-pointer
endif
CFLAGS_T := $(CFLAGS_COMMON) -O1 -g $(SAN) -DFO_TESTING -MMD -MP

MAINS    := engine/fanoutd.c engine/devbroker.c
LIB_SRCS := $(filter-out $(MAINS),$(wildcard engine/*.c channels/*.c \
                                               prefs/*.c))
UNIT     := $(wildcard tests/unit/test_*.c)
ITEST    := $(wildcard tests/integration/itest_*.c)
TSUPPORT := $(wildcard tests/support/*.c)
BENCHES  := $(wildcard bench/*/main.c)
# Provider fakes: tests/fakes/fake_NAME.c is the program fake-NAME, with
# the HTTPS server of tests/fakes/fakehttp.c.
FAKES    := $(wildcard tests/fakes/fake_*.c)
FAKE_R   := $(FAKES:tests/fakes/fake_%.c=build/fake-%)
FAKE_T   := $(FAKES:tests/fakes/fake_%.c=build/test/fake-%)
FAKEHTTP_T := $(patsubst %.c,build/test/obj/%.o,\
                $(wildcard tests/fakes/fakehttp.c))

LIB_R    := $(B)/libfanout.a
LIB_T    := $(T)/libfanout.a

.PHONY: all test unit run stop bench deps services clean check

all: $(B)/fanoutd $(B)/fanout-devbroker $(FAKE_R)

$(B)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_R) -c $< -o $@

$(T)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_T) -c $< -o $@

$(LIB_R): $(LIB_SRCS:%.c=$(B)/obj/%.o)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

$(LIB_T): $(LIB_SRCS:%.c=$(T)/obj/%.o)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

$(B)/fanoutd: $(B)/obj/engine/fanoutd.o $(LIB_R)
	$(CC) $(CFLAGS_R) -o $@ $^ $(LIBS)

$(B)/fanout-devbroker: $(B)/obj/engine/devbroker.o $(LIB_R)
	$(CC) $(CFLAGS_R) -o $@ $^ $(LIBS)

$(T)/fanoutd: $(T)/obj/engine/fanoutd.o $(LIB_T)
	$(CC) $(CFLAGS_T) -o $@ $^ $(LIBS)

$(T)/fanout-devbroker: $(T)/obj/engine/devbroker.o $(LIB_T)
	$(CC) $(CFLAGS_T) -o $@ $^ $(LIBS)

$(T)/tests/%: $(T)/obj/tests/unit/%.o $(TSUPPORT:%.c=$(T)/obj/%.o) \
              $(FAKEHTTP_T) $(LIB_T)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_T) -o $@ $^ $(LIBS) $(TEST_LIBS)

$(T)/itests/%: $(T)/obj/tests/integration/%.o \
               $(TSUPPORT:%.c=$(T)/obj/%.o) $(FAKEHTTP_T) $(LIB_T)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_T) -o $@ $^ $(LIBS) $(TEST_LIBS)

$(B)/fake-%: $(B)/obj/tests/fakes/fake_%.o $(B)/obj/tests/fakes/fakehttp.o \
             $(LIB_R)
	$(CC) $(CFLAGS_R) -o $@ $^ $(LIBS)

$(T)/fake-%: $(T)/obj/tests/fakes/fake_%.o $(T)/obj/tests/fakes/fakehttp.o \
             $(LIB_T)
	$(CC) $(CFLAGS_T) -o $@ $^ $(LIBS)

$(B)/bench/%: $(B)/obj/bench/%/main.o $(B)/obj/bench/common.o $(LIB_R)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_R) -o $@ $^ $(LIBS)

TEST_BINS := $(UNIT:tests/unit/%.c=$(T)/tests/%) \
             $(ITEST:tests/integration/%.c=$(T)/itests/%)

# Builds everything the suite needs; `make test` runs it.
test-build: $(TEST_BINS) $(T)/fanoutd $(T)/fanout-devbroker $(FAKE_T)

deps:
	@scripts/deps.sh

services:
	@scripts/services.sh start

test: deps
	@$(MAKE) --no-print-directory test-build
	@scripts/services.sh start
	@tests/run.sh $(T)

unit: test-build
	@tests/run.sh $(T) unit

run: deps
	@$(MAKE) --no-print-directory all
	@scripts/run.sh

stop:
	@scripts/run.sh stop

bench: all $(BENCHES:bench/%/main.c=$(B)/bench/%)
	@for b in $(BENCHES:bench/%/main.c=$(B)/bench/%); do $$b || exit 1; done

# Rejects bare markers: a known shortcoming is written out in words and
# listed in docs/known-limitations.md.
check:
	@! grep -rnwE 'TODO|FIXME|XXX' engine channels prefs include tests \
	    bench scripts || { echo "bare marker found"; exit 1; }

clean:
	rm -rf build

-include $(shell find build -name '*.d' 2>/dev/null)
