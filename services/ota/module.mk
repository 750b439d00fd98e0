# services/ota: one binary, build/<variant>/services/ota/ota
OTA_SRC := $(sort $(wildcard services/ota/*.c))
OTA_BIN := $(B)/services/ota/ota

$(OTA_BIN): $(patsubst %.c,$(B)/%.o,$(OTA_SRC)) $(LIBCOMMON)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

BINS += $(OTA_BIN)
SERVICES += ota

# Semantic versions and the chunk cache are unit-tested on their own.
$(B)/tests/unit/test_ota_semver.o: CPPFLAGS += -Iservices/ota
$(B)/tests/unit/test_ota_semver: $(B)/services/ota/ota_semver.o
# The cache needs libcommon after it on the link line (the generic test rule puts it first).
OTA_TEST_CACHE := $(B)/tests/unit/test_ota_cache
$(OTA_TEST_CACHE).o: CPPFLAGS += -Iservices/ota
$(OTA_TEST_CACHE): $(OTA_TEST_CACHE).o $(B)/services/ota/ota_cache.o $(B)/tests/support/test.o $(LIBCOMMON)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@
