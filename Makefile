# iotsuite: top-level build. `make help` lists the targets.
#
# One place for flags; generated code (protoc-c output, the embedded descriptor set) goes to
# build/gen and is a prerequisite, never committed. VARIANT=asan builds the same tree with
# AddressSanitizer + UndefinedBehaviorSanitizer into build/asan; VARIANT=fuzz builds the libFuzzer
# targets (tests/fuzz) with clang into build/fuzz (`make fuzz`).

.DEFAULT_GOAL := all
.SUFFIXES:
.DELETE_ON_ERROR:

VARIANT ?= release
PKGS    := grpc gpr libprotobuf-c libpq hiredis libmicrohttpd jansson openssl
GEN     := build/gen

ifeq ($(VARIANT),asan)
  B       := build/asan
  OPT     := -O1 -g -fno-omit-frame-pointer
  SANFLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined
else ifeq ($(VARIANT),release)
  B       := build/release
  OPT     := -O2 -g
  SANFLAGS :=
else ifeq ($(VARIANT),fuzz)
  # Coverage for libFuzzer on every object; the targets link libFuzzer's main (FUZZ_RULE below).
  CC      := clang
  B       := build/fuzz
  OPT     := -O1 -g -fno-omit-frame-pointer
  SANFLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined
  FUZZ_CFLAGS := -fsanitize=fuzzer-no-link
else
  $(error VARIANT must be release, asan or fuzz)
endif

# pkg-config is evaluated lazily so that `make deps` works before the -dev packages exist.
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   = $(shell pkg-config --libs $(PKGS) 2>/dev/null)

WARN    := -Wall -Wextra -Wstrict-prototypes -Wwrite-strings -Werror
CFLAGS  := -std=c11 -D_GNU_SOURCE $(OPT) $(WARN) -pthread $(SANFLAGS) $(FUZZ_CFLAGS) -MMD -MP
CPPFLAGS = -Ilibs/common -I$(GEN) $(PKG_CFLAGS)
LDFLAGS := -pthread -Wl,--as-needed $(SANFLAGS)
LDLIBS   = $(PKG_LIBS) -lm

# ---- generated code ------------------------------------------------------------------------
GRPC_PROTO_DIR := /usr/share/grpc-proto
PB_INCLUDE     := /usr/include
PROTOS         := $(shell find proto -name '*.proto' | sort)
GRPC_PROTOS    := grpc/health/v1/health.proto grpc/reflection/v1alpha/reflection.proto
# Well-known types used by project protos (Timestamp, FieldMask, Struct) and by reflection.
WKT_PROTOS     := google/protobuf/descriptor.proto google/protobuf/timestamp.proto \
                  google/protobuf/field_mask.proto google/protobuf/struct.proto
PROTO_PATH     := -Iproto -I$(GRPC_PROTO_DIR) -I$(PB_INCLUDE)

GEN_C := $(patsubst proto/%.proto,$(GEN)/%.pb-c.c,$(PROTOS)) \
         $(patsubst %.proto,$(GEN)/%.pb-c.c,$(GRPC_PROTOS) $(WKT_PROTOS))
GEN_H := $(GEN_C:.c=.h)
GEN_DESCSET := $(GEN)/descriptor_set.pb
GEN_EMBED   := $(GEN)/cm_descriptor_set.c

$(GEN)/%.pb-c.c $(GEN)/%.pb-c.h: proto/%.proto
	@mkdir -p $(GEN)
	protoc-c $(PROTO_PATH) --c_out=$(GEN) $<

$(GEN)/grpc/%.pb-c.c $(GEN)/grpc/%.pb-c.h: $(GRPC_PROTO_DIR)/grpc/%.proto
	@mkdir -p $(GEN)
	protoc-c $(PROTO_PATH) --c_out=$(GEN) $<

$(GEN)/google/%.pb-c.c $(GEN)/google/%.pb-c.h: $(PB_INCLUDE)/google/%.proto
	@mkdir -p $(GEN)
	protoc-c $(PROTO_PATH) --c_out=$(GEN) $<

# Every server embeds one descriptor set (all project protos plus health and reflection) so that
# server reflection can answer file and symbol queries without files on disk.
$(GEN_DESCSET): $(PROTOS) | $(GEN_H)
	@mkdir -p $(GEN)
	protoc $(PROTO_PATH) --include_imports --descriptor_set_out=$@ $(PROTOS) $(GRPC_PROTOS)

$(GEN_EMBED): $(GEN_DESCSET) tools/embed.sh
	sh tools/embed.sh cm__descriptor_set $< > $@

# ---- libs/common ---------------------------------------------------------------------------
COMMON_SRC := $(sort $(wildcard libs/common/*.c))
COMMON_OBJ := $(patsubst %.c,$(B)/%.o,$(COMMON_SRC)) \
              $(patsubst %.c,$(B)/%.o,$(GEN_C) $(GEN_EMBED))
LIBCOMMON  := $(B)/libiotcommon.a

# Generated sources are compiled with the same flags; headers must exist before any compile.
$(B)/%.o: %.c | $(GEN_H)
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -c $< -o $@

$(LIBCOMMON): $(COMMON_OBJ)
	@rm -f $@
	$(AR) rcs $@ $^

# ---- services (each adds itself to SERVICES and BINS) --------------------------------------
SERVICES :=
BINS     :=
-include $(wildcard services/*/module.mk)

# ---- tools shipped with the services (in every image) --------------------------------------
HEALTH_PROBE := $(B)/tools/iot-health-probe

$(HEALTH_PROBE): $(B)/tools/iot_health_probe.o $(LIBCOMMON)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

TOOL_BINS := $(HEALTH_PROBE)

# ---- tools for local runs (not in the images) ----------------------------------------------
# iot-sim: simulated devices for `make demo` and tests/integration/test_sim.c.
SIM := $(B)/tools/iot-sim

$(SIM): $(B)/tools/iot_sim.o $(LIBCOMMON)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

DEV_TOOL_BINS := $(SIM)

# ---- tests ---------------------------------------------------------------------------------
TEST_SUPPORT_SRC := tests/support/echo_service.c tests/support/test.c tests/support/proc.c
TEST_SUPPORT_OBJ := $(patsubst %.c,$(B)/%.o,$(TEST_SUPPORT_SRC))
TEST_SRC  := $(sort $(wildcard tests/unit/*.c tests/integration/*.c))
TEST_BINS := $(patsubst tests/%.c,$(B)/tests/%,$(TEST_SRC))
ECHO_SERVER := $(B)/tests/echo_server

$(B)/tests/%.o: CPPFLAGS += -Itests/support

$(B)/tests/%: $(B)/tests/%.o $(TEST_SUPPORT_OBJ) $(LIBCOMMON)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

$(ECHO_SERVER): $(B)/tests/support/echo_server.o $(B)/tests/support/echo_service.o $(LIBCOMMON)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

# ---- fuzz targets (tests/fuzz/README.md) --------------------------------------------------
# tests/fuzz/fuzz_<name>.c fuzzes the service code FUZZ_LINK_<name> names. VARIANT=fuzz links it
# with libFuzzer into build/fuzz/fuzz/ (make fuzz); the other variants link it with
# tests/fuzz/driver.c into BUILD/tests/fuzz/, a test program that replays the target's corpus and
# regressions (tests/tests.list).
FUZZ_NAMES := $(patsubst tests/fuzz/fuzz_%.c,%,$(sort $(wildcard tests/fuzz/fuzz_*.c)))
fuzz__svc = $(patsubst %.c,$(B)/%.o,$(filter-out %/main.c,$(sort $(wildcard services/$(1)/*.c))))
FUZZ_LINK_proto    := $(foreach s,device-mgmt ingest ota processing registry,$(call fuzz__svc,$(s)))
FUZZ_LINK_rest     := $(call fuzz__svc,gateway) $(patsubst %.c,$(B)/%.o,$(GATEWAY_WEB_C))
FUZZ_LINK_batch    := $(B)/services/ingest/ing_batch.o
FUZZ_LINK_semver   := $(B)/services/ota/ota_semver.o
FUZZ_LINK_selector :=
FUZZ_LINK_upload   := $(B)/services/ota/ota_framing.o $(B)/services/ota/ota_semver.o

$(B)/tests/fuzz/%.o: CPPFLAGS += -Itests/fuzz $(patsubst %,-I%,$(wildcard services/*))

ifeq ($(VARIANT),fuzz)
FUZZ_BINS := $(patsubst %,$(B)/fuzz/fuzz_%,$(FUZZ_NAMES))
define FUZZ_RULE
$(B)/fuzz/fuzz_$(1): $(B)/tests/fuzz/fuzz_$(1).o $(FUZZ_LINK_$(1)) $(LIBCOMMON)
	@mkdir -p $$(dir $$@)
	$$(CC) $$(LDFLAGS) -fsanitize=fuzzer $$^ $$(LDLIBS) -o $$@
endef
else
FUZZ_BINS := $(patsubst %,$(B)/tests/fuzz/fuzz_%,$(FUZZ_NAMES))
define FUZZ_RULE
$(B)/tests/fuzz/fuzz_$(1): $(B)/tests/fuzz/fuzz_$(1).o $(B)/tests/fuzz/driver.o $(FUZZ_LINK_$(1)) $(LIBCOMMON)
	@mkdir -p $$(dir $$@)
	$$(CC) $$(LDFLAGS) $$^ $$(LDLIBS) -o $$@
endef
endif
$(foreach n,$(FUZZ_NAMES),$(eval $(call FUZZ_RULE,$(n))))

# C benchmark drivers live with the other benchmarks but build with the suite (so they cannot rot).
BENCH_C_BINS := $(patsubst bench/%.c,$(B)/bench/%,$(sort $(wildcard bench/*.c)))

$(B)/bench/%: $(B)/bench/%.o $(LIBCOMMON)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

# ---- top-level targets ---------------------------------------------------------------------
.PHONY: all bins deps test test-asan fuzz fuzz-bins run demo run-clean bench images test-images clean help

# The service binaries and the tools shipped with them, nothing else (what an image needs).
bins: $(BINS) $(TOOL_BINS)

all: $(LIBCOMMON) $(BINS) $(TOOL_BINS) $(DEV_TOOL_BINS) $(ECHO_SERVER) $(TEST_BINS) $(FUZZ_BINS) $(BENCH_C_BINS)

deps:
	sh tools/deps.sh

test: deps
	$(MAKE) --no-print-directory VARIANT=$(VARIANT) all
	sh tests/run.sh $(B)

test-asan: deps
	$(MAKE) --no-print-directory VARIANT=asan all
	sh tests/run.sh build/asan

# Each fuzz target for FUZZ_SECONDS (FUZZ_TARGETS: a subset), then executions and crashes per
# target; fails when one crashed (tests/fuzz/README.md).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= $(FUZZ_NAMES)
fuzz: deps
	$(MAKE) --no-print-directory VARIANT=fuzz fuzz-bins
	sh tests/fuzz/run.sh build/fuzz $(FUZZ_SECONDS) $(FUZZ_TARGETS)

fuzz-bins: $(FUZZ_BINS)

run: deps
	$(MAKE) --no-print-directory all
	sh tools/run.sh $(B)

demo: deps
	$(MAKE) --no-print-directory all
	sh tools/run.sh --demo $(B)

run-clean:
	sh tools/run.sh --clean

bench: deps
	$(MAKE) --no-print-directory all
	$(MAKE) --no-print-directory -C bench B=../$(B)
	bash bench/run.sh $(B)

# Container images (docker/README.md): built with Debian's Docker engine from a locally made base.
images:
	sh docker/build.sh

test-images: deps images
	sh docker/test-images.sh

clean:
	rm -rf build

help:
	@echo "make            build everything (build/release)"
	@echo "make deps       install the Debian and npm packages the build, tests and run need"
	@echo "make test       deps, build, then the whole test suite (ends with 'N passed, N failed')"
	@echo "make test-asan  the same suite built with -fsanitize=address,undefined"
	@echo "make fuzz       each libFuzzer target (tests/fuzz) for FUZZ_SECONDS (60), then executions and crashes"
	@echo "make run        start the suite locally with its own Postgres and Redis (state in ./state)"
	@echo "make demo       make run plus iot-sim: a few hundred simulated devices"
	@echo "make run-clean  wipe ./state (refused while make run uses it)"
	@echo "make bench      benchmarks against reference runs (grpc++ servers, raw Postgres/Redis)"
	@echo "make images     the six service images (docker/README.md), iotsuite/<service>:<version>"
	@echo "make test-images  run each image against a loopback Postgres/Redis (ends with 'N passed, N failed')"

-include $(shell find build -name '*.d' 2>/dev/null)
