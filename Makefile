# dsv3: one build for everything. `make`, `make test`, `make demo`, `make install`.
# See README.md. `make DEBUG=1` builds host code with AddressSanitizer and UBSan.

VERSION_BASE := 0.1.0
GIT_REV := $(shell git rev-parse --short=12 HEAD 2>/dev/null)
VERSION := $(VERSION_BASE)$(if $(GIT_REV), ($(GIT_REV)),)

PREFIX ?= /usr/local
BUILD ?= build
CC ?= cc
CFLAGS_BASE := -std=c11 -D_GNU_SOURCE -Wall -Wextra -pthread -fopenmp -MMD -MP -I$(BUILD)/gen
ifeq ($(DEBUG),1)
  OPT := -O0 -g -fsanitize=address,undefined -fno-omit-frame-pointer
  LDOPT := -fsanitize=address,undefined
else
  OPT := -O2 -g
  LDOPT :=
endif
CFLAGS ?=
CFLAGS += $(CFLAGS_BASE) $(OPT)
# The small Debian libraries are linked statically: the programs then run on machines that
# lack their runtime packages (cluster nodes, the GPU device image).
# -fopenmp: the CPU model's matmuls, attention heads and cross-entropy rows (lib/ops.c);
# programs link with $(CC) also when the library holds CUDA objects, so this covers both.
LDLIBS := -Wl,-Bstatic -lzstd -lxxhash -ljansson -lpcre2-8 -Wl,-Bdynamic -lm -ldl -pthread -fopenmp

# CUDA: with nvcc the kernels build for Hopper (sm_90a machine code) plus compute_90 PTX,
# which newer GPUs compile at load time. Without nvcc the library is CPU-only.
CUDA_HOME ?= /usr/local/cuda
NVCC ?= $(shell command -v nvcc 2>/dev/null || { [ -x $(CUDA_HOME)/bin/nvcc ] && echo $(CUDA_HOME)/bin/nvcc; })
NVCC_ARCH := -gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_90,code=compute_90
NVCCFLAGS := -O3 -std=c++17 $(NVCC_ARCH) -MMD -MP -Xcompiler -Wall,-Wextra

LIB_SRC := $(filter-out lib/gpu_none.c,$(wildcard lib/*.c))
CU_SRC := $(wildcard kernels/*.cu)
ifneq ($(NVCC),)
  LIB_OBJ := $(LIB_SRC:%.c=$(BUILD)/obj/%.o) $(CU_SRC:%.cu=$(BUILD)/obj/%.o)
  LDLIBS += -L$(CUDA_HOME)/lib64 -lcudart_static -ldl -lrt -lstdc++
  # cuBLASLt (dense GEMMs) and cuBLAS (grouped expert GEMMs) are too big to link statically.
  LDLIBS += -Wl,--as-needed -lcublasLt -lcublas -Wl,--no-as-needed -Wl,-rpath,$(CUDA_HOME)/lib64
  CUDA_NOTE := with CUDA ($(NVCC))
  # host C that talks to the CUDA runtime directly (GPU tests) sees its headers
  CFLAGS += -I$(CUDA_HOME)/include -DDSV3_HAVE_CUDA=1
else
  LIB_OBJ := $(LIB_SRC:%.c=$(BUILD)/obj/%.o) $(BUILD)/obj/lib/gpu_none.o
  CUDA_NOTE := CPU-only: nvcc not found
  ifeq ($(filter clean deps,$(MAKECMDGOALS)),)
    $(info dsv3: nvcc not found; building the CPU-only library (GPU tests will be skipped))
  endif
endif

# The MPI backend of lib/comm is a plugin (lib/dsv3/comm-mpi.so beside bin/), opened only
# when an MPI launcher starts a program: the programs themselves never need libmpi.
MPICC ?= $(shell command -v mpicc 2>/dev/null)
MPI_PLUGIN := $(if $(MPICC),$(BUILD)/lib/dsv3/comm-mpi.so)
# The CUPTI tracer (tools/cupti_trace.c), a CUDA injection library for scripts/trace-train.sh:
# built where CUDA and CUPTI's headers are, never linked into anything.
TRACE_SO := $(if $(NVCC),$(if $(wildcard $(CUDA_HOME)/include/cupti.h),$(BUILD)/lib/dsv3/cupti-trace.so))

CMD_SRC := $(wildcard cmd/*.c)
BINS := $(CMD_SRC:cmd/%.c=$(BUILD)/bin/%)
TEST_SRC := $(wildcard tests/unit/test_*.c) $(wildcard tests/gpu/test_*.c)
TESTS := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
MANS := $(wildcard man/*.1)

# The version string lives in a generated header rewritten only when it changes, so a new
# commit rebuilds lib/cli.o and nothing else.
VERSION_H := $(BUILD)/gen/dsv3_version.h
$(shell mkdir -p $(BUILD)/gen; v='#define DSV3_VERSION "$(VERSION)"'; \
  [ "$$(cat $(VERSION_H) 2>/dev/null)" = "$$v" ] || echo "$$v" > $(VERSION_H))

# Keep object files of programs and tests between builds.
.SECONDARY:

.PHONY: all deps check-deps test demo install clean fuzz bench tests
.DEFAULT_GOAL := all

all: check-deps $(BUILD)/libdsv3.a $(BINS) $(MPI_PLUGIN) $(TRACE_SO)

check-deps:
	@scripts/deps.sh --check

deps:
	@scripts/deps.sh

$(BUILD)/libdsv3.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/obj/%.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@

$(BUILD)/lib/dsv3/comm-mpi.so: lib/plugins/comm_mpi.c lib/comm_backend.h
	@mkdir -p $(dir $@)
	$(MPICC) -std=c11 -O2 -g -Wall -Wextra -fPIC -shared $< -o $@

$(BUILD)/lib/dsv3/cupti-trace.so: tools/cupti_trace.c tools/cupti_util.h
	@mkdir -p $(dir $@)
	$(CC) -std=c11 -O2 -Wall -Wextra -fPIC -shared -I$(CUDA_HOME)/include $< -o $@ -ldl

$(BUILD)/bin/%: $(BUILD)/obj/cmd/%.o $(BUILD)/libdsv3.a
	@mkdir -p $(dir $@)
	$(CC) $(LDOPT) -o $@ $^ $(LDLIBS)

$(BUILD)/tests/%: $(BUILD)/obj/tests/%.o $(BUILD)/libdsv3.a
	@mkdir -p $(dir $@)
	$(CC) $(LDOPT) -o $@ $^ $(LDLIBS)

tests: all $(TESTS)

# make test: dependencies, build, every test; the last line is "N passed, N failed, N skipped".
test:
	@scripts/deps.sh
	@$(MAKE) --no-print-directory tests
	@BUILD=$(BUILD) tests/run.sh

demo:
	@scripts/deps.sh
	@$(MAKE) --no-print-directory all
	@BUILD=$(BUILD) scripts/demo.sh

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/man/man1
	install -m 755 $(BINS) $(DESTDIR)$(PREFIX)/bin/
	install -m 644 $(MANS) $(DESTDIR)$(PREFIX)/share/man/man1/
	$(if $(MPI_PLUGIN),install -d $(DESTDIR)$(PREFIX)/lib/dsv3 && install -m 755 $(MPI_PLUGIN) $(DESTDIR)$(PREFIX)/lib/dsv3/)

# Coverage-guided fuzzing of the shard reader with libFuzzer (clang); not part of `make test`.
# FUZZ_SECONDS=600 by default; findings land in $(BUILD)/fuzz/.
FUZZ_SECONDS ?= 600
fuzz: all
	@BUILD=$(BUILD) FUZZ_SECONDS=$(FUZZ_SECONDS) tests/fuzz/run.sh

bench: all
	@BUILD=$(BUILD) scripts/bench-shard.sh

clean:
	rm -rf $(BUILD)

-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)
