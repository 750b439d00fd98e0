# services/ingest: one binary, build/<variant>/services/ingest/ingest
ING_SRC := $(sort $(wildcard services/ingest/*.c))
ING_BIN := $(B)/services/ingest/ingest

$(ING_BIN): $(patsubst %.c,$(B)/%.o,$(ING_SRC)) $(LIBCOMMON)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

BINS += $(ING_BIN)
SERVICES += ingest
