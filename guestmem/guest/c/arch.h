/* The few x86-64 instructions the C guest needs, as inline asm.
 *
 * PVALIDATE, VMGEXIT and TDCALL are written as bytes, so any gcc/binutils assembles them.
 */
#ifndef GUESTMEM_CGUEST_ARCH_H
#define GUESTMEM_CGUEST_ARCH_H

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;

static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

static inline void outb(u32 port, u8 value)
{
    __asm__ volatile("outb %0, %w1" : : "a"(value), "Nd"(port) : "memory");
}

static inline void outl(u32 port, u32 value)
{
    __asm__ volatile("outl %0, %w1" : : "a"(value), "Nd"(port) : "memory");
}

/* `out dx, al` with r8..r12 loaded: the doorbells whose arguments the host reads from registers. */
static inline void out_regs(u32 port, u64 r8v, u64 r9v, u64 r10v, u64 r11v, u64 r12v)
{
    register u64 r8 __asm__("r8") = r8v;
    register u64 r9 __asm__("r9") = r9v;
    register u64 r10 __asm__("r10") = r10v;
    register u64 r11 __asm__("r11") = r11v;
    register u64 r12 __asm__("r12") = r12v;
    __asm__ volatile("outb %%al, %%dx"
                     : : "a"(0), "d"(port), "r"(r8), "r"(r9), "r"(r10), "r"(r11), "r"(r12) : "memory");
}

static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr) : "memory");
    return ((u64)hi << 32) | lo;
}

static inline void wrmsr(u32 msr, u64 value)
{
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)value), "d"((u32)(value >> 32)) : "memory");
}

static inline void write_cr3(u64 value)
{
    __asm__ volatile("mov %0, %%cr3" : : "r"(value) : "memory");
}

static inline void invlpg(u64 va)
{
    __asm__ volatile("invlpg (%0)" : : "r"(va) : "memory");
}

static inline void hlt(void)
{
    __asm__ volatile("hlt" : : : "memory");
}

/* PVALIDATE: rax = va, ecx = page size (0 = 4 KiB), edx = 1 validate / 0 rescind.
 * Returns eax; *no_update = RFLAGS.CF (the page already had the requested state). */
static inline u32 pvalidate(u64 va, u32 size, u32 validate, int *no_update)
{
    u32 ret;
    u8 cf;
    __asm__ volatile(".byte 0xf2, 0x0f, 0x01, 0xff\n\tsetc %1"
                     : "=a"(ret), "=qm"(cf) : "a"(va), "c"(size), "d"(validate) : "memory", "cc");
    *no_update = cf;
    return ret;
}

/* VMGEXIT (rep; vmmcall): hand the GHCB MSR request to the hypervisor. */
static inline void vmgexit(void)
{
    __asm__ volatile(".byte 0xf3, 0x0f, 0x01, 0xd9" : : : "memory");
}

/* TDCALL with rax = leaf, rcx = arg; returns rax, and rcx/rdx after the call. */
static inline u64 tdcall(u64 leaf, u64 rcx_in, u64 *rcx_out, u64 *rdx_out)
{
    u64 rax = leaf, rcx = rcx_in, rdx = 0;
    __asm__ volatile(".byte 0x66, 0x0f, 0x01, 0xcc"
                     : "+a"(rax), "+c"(rcx), "+d"(rdx) : : "r8", "r9", "r10", "r11", "memory");
    if (rcx_out)
        *rcx_out = rcx;
    if (rdx_out)
        *rdx_out = rdx;
    return rax;
}

/* TDG.VP.VMCALL (TDCALL leaf 0), GHCI standard: r10 = 0, r11 = subfunction, r12/r13 = arguments.
 * Returns r10 (0 = success); *status = rax (the TDCALL's own status). */
static inline u64 tdvmcall(u64 subfn, u64 arg1, u64 arg2, u64 *status)
{
    register u64 r10 __asm__("r10") = 0;
    register u64 r11 __asm__("r11") = subfn;
    register u64 r12 __asm__("r12") = arg1;
    register u64 r13 __asm__("r13") = arg2;
    u64 rax = 0, rcx = (1u << 10) | (1u << 11) | (1u << 12) | (1u << 13); /* registers exposed */
    __asm__ volatile(".byte 0x66, 0x0f, 0x01, 0xcc"
                     : "+a"(rax), "+c"(rcx), "+r"(r10), "+r"(r11), "+r"(r12), "+r"(r13)
                     : : "rdx", "r8", "r9", "memory");
    *status = rax;
    return r10;
}

#endif
