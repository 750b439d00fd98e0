# services/processing: the window and detector core (pure C, unit-tested); the service binary
# joins here as it is built.
$(B)/tests/unit/test_proc_window.o: CPPFLAGS += -Iservices/processing
$(B)/tests/unit/test_proc_window: $(B)/services/processing/proc_window.o $(B)/services/processing/proc_detect.o
