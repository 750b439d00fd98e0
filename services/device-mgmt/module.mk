# services/device-mgmt: one binary, build/<variant>/services/device-mgmt/device-mgmt
DM_SRC := $(sort $(wildcard services/device-mgmt/*.c))
DM_BIN := $(B)/services/device-mgmt/device-mgmt

$(DM_BIN): $(patsubst %.c,$(B)/%.o,$(DM_SRC)) $(LIBCOMMON)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

# The CA is pure OpenSSL, so its unit test links it directly.
$(B)/tests/unit/test_dm_ca.o: CPPFLAGS += -Iservices/device-mgmt
$(B)/tests/unit/test_dm_ca: $(B)/services/device-mgmt/dm_ca.o

BINS += $(DM_BIN)
SERVICES += device-mgmt
