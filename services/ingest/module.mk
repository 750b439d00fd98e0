# services/ingest: one binary, build/<variant>/services/ingest/ingest
ING_SRC := $(sort $(wildcard services/ingest/*.c))
ING_BIN := $(B)/services/ingest/ingest

$(ING_BIN): $(patsubst %.c,$(B)/%.o,$(ING_SRC)) $(LIBCOMMON)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

BINS += $(ING_BIN)
SERVICES += ingest

# The ingest benchmark encodes its reference rows with the service's own encoder.
$(B)/bench/ingest_bench.o: CPPFLAGS += -Iservices/ingest
$(B)/bench/ingest_bench: $(B)/services/ingest/ing_batch.o
