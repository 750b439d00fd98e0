# services/gateway: one binary, build/<variant>/services/gateway/gateway
GATEWAY_SRC := $(sort $(wildcard services/gateway/*.c))
GATEWAY_BIN := $(B)/services/gateway/gateway

$(GATEWAY_BIN): $(patsubst %.c,$(B)/%.o,$(GATEWAY_SRC)) $(LIBCOMMON)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

BINS += $(GATEWAY_BIN)
SERVICES += gateway
