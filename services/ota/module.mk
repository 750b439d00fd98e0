# services/ota: one binary, build/<variant>/services/ota/ota
OTA_SRC := $(sort $(wildcard services/ota/*.c))
OTA_BIN := $(B)/services/ota/ota

$(OTA_BIN): $(patsubst %.c,$(B)/%.o,$(OTA_SRC)) $(LIBCOMMON)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

BINS += $(OTA_BIN)
SERVICES += ota

# Semantic versions are unit-tested on their own.
$(B)/tests/unit/test_ota_semver.o: CPPFLAGS += -Iservices/ota
$(B)/tests/unit/test_ota_semver: $(B)/services/ota/ota_semver.o
