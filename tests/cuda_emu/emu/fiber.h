// Cooperative fibers for the CUDA emulator: one per emulated CUDA thread, switched by hand on x86-64
// (callee-saved registers, MXCSR and the x87 control word; about 15 ns per switch) or by ucontext
// elsewhere, or when EMU_USE_UCONTEXT is defined (swapcontext makes a system call: about 20x slower).
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <vector>

#if !defined(__x86_64__) && !defined(EMU_USE_UCONTEXT)
#define EMU_USE_UCONTEXT 1
#endif

#if defined(EMU_USE_UCONTEXT)
#include <ucontext.h>
#endif

namespace emu::detail {

using FiberEntry = void (*)(void*);

#if !defined(EMU_USE_UCONTEXT)
// emu_ctx_switch(void** save_sp, void* load_sp): pushes the callee-saved state on the current stack, stores
// the stack pointer in *save_sp, loads load_sp and pops the state saved there. emu_ctx_start is where a new
// fiber first "returns" to: it calls r13(r12). Weak symbols, so that several translation units may include
// this header.
asm(R"(
  .text
  .weak emu_ctx_switch
  .hidden emu_ctx_switch
  .type emu_ctx_switch,@function
emu_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_ctx_switch,.-emu_ctx_switch

  .weak emu_ctx_start
  .hidden emu_ctx_start
  .type emu_ctx_start,@function
emu_ctx_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size emu_ctx_start,.-emu_ctx_start
)");
extern "C" void emu_ctx_switch(void** save_sp, void* load_sp);
extern "C" void emu_ctx_start();
#endif

// A stack with a guard page below it, reused across blocks and launches by the OS thread that made it.
struct Stack {
  static constexpr std::size_t kSize = 256 * 1024;
  void* base = nullptr;  // the guard page
  std::size_t total = 0;

  Stack() {
    const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    total = kSize + page;
    base = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) throw std::bad_alloc();
    mprotect(base, page, PROT_NONE);
  }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  ~Stack() {
    if (base) munmap(base, total);
  }
  char* top() const { return static_cast<char*>(base) + total; }
  char* bottom() const { return static_cast<char*>(base) + (total - kSize); }
};

// An execution context: either a fiber on its own stack or the OS thread's own (scheduler) context.
class Context {
 public:
  // Prepares this context to run entry(arg) on `stack` when first switched to.
  void start(Stack& stack, FiberEntry entry, void* arg) {
#if defined(EMU_USE_UCONTEXT)
    getcontext(&uc_);
    uc_.uc_stack.ss_sp = stack.bottom();
    uc_.uc_stack.ss_size = Stack::kSize;
    uc_.uc_link = nullptr;
    // makecontext passes int arguments: split the two pointers.
    const auto e = reinterpret_cast<std::uintptr_t>(entry);
    const auto a = reinterpret_cast<std::uintptr_t>(arg);
    makecontext(&uc_, reinterpret_cast<void (*)()>(&Context::uc_trampoline), 4, unsigned(e >> 32),
                unsigned(e & 0xffffffffu), unsigned(a >> 32), unsigned(a & 0xffffffffu));
#else
    // Layout, from the 16-byte aligned top T down: [T-8] emu_ctx_start (popped by ret, leaving rsp = T),
    // [T-16..T-56] rbp rbx r12 r13 r14 r15, [T-64] mxcsr and x87 control word.
    auto* top = reinterpret_cast<std::uint64_t*>(reinterpret_cast<std::uintptr_t>(stack.top()) & ~std::uintptr_t(15));
    top[-1] = reinterpret_cast<std::uint64_t>(&emu_ctx_start);
    top[-2] = 0;                                          // rbp
    top[-3] = 0;                                          // rbx
    top[-4] = reinterpret_cast<std::uint64_t>(arg);       // r12
    top[-5] = reinterpret_cast<std::uint64_t>(entry);     // r13
    top[-6] = 0;                                          // r14
    top[-7] = 0;                                          // r15
    top[-8] = 0x1F80ull | (std::uint64_t(0x037F) << 32);  // default MXCSR, x87 control word
    sp_ = &top[-8];
#endif
  }

  // Saves the running context into *this and resumes `to`.
  void switch_to(Context& to) {
#if defined(EMU_USE_UCONTEXT)
    swapcontext(&uc_, &to.uc_);
#else
    emu_ctx_switch(&sp_, to.sp_);
#endif
  }

 private:
#if defined(EMU_USE_UCONTEXT)
  static void uc_trampoline(unsigned eh, unsigned el, unsigned ah, unsigned al) {
    auto entry = reinterpret_cast<FiberEntry>((std::uintptr_t(eh) << 32) | el);
    entry(reinterpret_cast<void*>((std::uintptr_t(ah) << 32) | al));
    std::abort();  // fibers never return
  }
  ucontext_t uc_{};
#else
  void* sp_ = nullptr;
#endif
};

// Stacks owned by the current OS thread, grown on demand and kept for later blocks and launches.
inline std::vector<Stack*>& thread_stacks(std::size_t n) {
  struct Pool {
    std::vector<Stack*> stacks;
    ~Pool() {
      for (Stack* s : stacks) delete s;
    }
  };
  thread_local Pool pool;
  while (pool.stacks.size() < n) pool.stacks.push_back(new Stack());
  return pool.stacks;
}

}  // namespace emu::detail
