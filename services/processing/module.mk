# services/processing: one binary, build/<variant>/services/processing/processing
PROC_SRC := $(sort $(wildcard services/processing/*.c))
PROC_BIN := $(B)/services/processing/processing

$(PROC_BIN): $(patsubst %.c,$(B)/%.o,$(PROC_SRC)) $(LIBCOMMON)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -lm -o $@

BINS += $(PROC_BIN)
SERVICES += processing

# The window and detector core is unit-tested on its own.
$(B)/tests/unit/test_proc_window.o: CPPFLAGS += -Iservices/processing
$(B)/tests/unit/test_proc_window: $(B)/services/processing/proc_window.o $(B)/services/processing/proc_detect.o
