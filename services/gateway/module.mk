# services/gateway: one binary, build/<variant>/services/gateway/gateway
GATEWAY_SRC := $(sort $(wildcard services/gateway/*.c))
GATEWAY_BIN := $(B)/services/gateway/gateway
# The dashboard (services/gateway/web) is embedded at build time: no files needed at run time.
GATEWAY_WEB := $(sort $(shell find services/gateway/web -type f ! -name '.*'))
GATEWAY_WEB_C := $(GEN)/gateway/gw_web_files.c

$(GATEWAY_WEB_C): $(GATEWAY_WEB) tools/embed_dir.sh
	@mkdir -p $(dir $@)
	sh tools/embed_dir.sh gw_web services/gateway/web > $@

$(GATEWAY_BIN): $(patsubst %.c,$(B)/%.o,$(GATEWAY_SRC) $(GATEWAY_WEB_C)) $(LIBCOMMON)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

BINS += $(GATEWAY_BIN)
SERVICES += gateway
