# services/registry: one binary, build/<variant>/services/registry/registry
REGISTRY_SRC := $(sort $(wildcard services/registry/*.c))
REGISTRY_BIN := $(B)/services/registry/registry

$(REGISTRY_BIN): $(patsubst %.c,$(B)/%.o,$(REGISTRY_SRC)) $(LIBCOMMON)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

BINS += $(REGISTRY_BIN)
SERVICES += registry
