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

# The HTTP client and the action workers are tested on their own. Their objects need libcommon
# after them on the link line (the generic test rule puts it first), so these link themselves.
# (tests/support/test.o by name: TEST_SUPPORT_OBJ is defined after this file is read.)
PROC_TEST_HTTP    := $(B)/tests/unit/test_proc_http
PROC_TEST_ACTIONS := $(B)/tests/integration/test_proc_actions
$(PROC_TEST_HTTP).o $(PROC_TEST_ACTIONS).o: CPPFLAGS += -Iservices/processing
$(PROC_TEST_HTTP): $(PROC_TEST_HTTP).o $(B)/services/processing/proc_http.o $(B)/tests/support/test.o $(LIBCOMMON)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@
$(PROC_TEST_ACTIONS): $(PROC_TEST_ACTIONS).o $(B)/services/processing/proc_actions.o $(B)/services/processing/proc_http.o \
                      $(B)/tests/support/test.o $(LIBCOMMON)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@
