/* guestmem's freestanding C guest: what a confidential guest's early boot does to its memory.
 *
 * It starts in 64-bit long mode on the loader's identity map (guestmem/guest/image.py), with the
 * stack at the end of the image, and then:
 *
 *  1. detects its flavour: SNP-like if CPUID 0x8000001F says SEV and SEV-SNP (EBX[5:0] = C-bit);
 *     TDX-like if CPUID leaf 0x21 carries the "IntelTDX    " signature (as Linux's tdx_early_init
 *     checks; TDCALL itself would be #UD on a CPU without TDX), then TDG.VP.INFO gives the GPA width
 *     and so the shared bit; otherwise plain (no private memory: no C-bit, no accept, no conversion);
 *  2. builds its own 4-level page tables (the loader window, which holds its code, stack and
 *     tables, as shared memory with 2 MiB pages; its data and bounce pages with 4 KiB pages,
 *     private = C-bit set / shared bit clear) and loads CR3;
 *  3. writes a pattern over its private data pages, accepting each page on first use (PVALIDATE or
 *     TDG.MEM.PAGE.ACCEPT) -- lazily, the way Linux accepts unaccepted memory as it allocates it;
 *  4. shares one bounce page with a virtual device (SNP: PVALIDATE rescind, page-state change to
 *     shared through the GHCB MSR protocol, C-bit cleared; TDX: MapGPA with the shared bit, PTE with
 *     the shared bit), writes requests there and rings the device doorbell; the host answers in the
 *     same page and the guest checks each answer;
 *  5. converts the page back to private (and re-validates or re-accepts it), checks that its private
 *     data survived, and reports the result through port I/O (proto.h).
 */
#include "arch.h"
#include "proto.h"

#define PAGE 4096ull
#define PTE_P 0x1ull
#define PTE_W 0x2ull
#define PTE_PS 0x80ull
#define POOL_PAGES 32
#define MAX_DATA_PAGES 4096
#define LOADER_GPA 0xFF000000ull
#define MSR_GHCB 0xC0010130u
#define GHCB_PSC_REQ 0x014ull
#define GHCB_PSC_RESP 0x015ull
#define TDG_VP_INFO 1
#define TDG_MEM_PAGE_ACCEPT 6
#define TDX_ALREADY_ACCEPTED 0xC0000B0A00000000ull
#define TDVMCALL_MAP_GPA 0x10001

/* Patched by the host (guestmem/guest/cbuild.py) before loading; these are the build's defaults. */
volatile struct guest_params params = {
    .magic = PARAMS_MAGIC,
    .data_gpa = 0x100000000ull,
    .data_pages = 16,
    .bounce_gpa = 0x100000000ull + 64 * PAGE,
    .rounds = 2,
    .payload = 256,
    .seed = 1,
};

static u64 pool[POOL_PAGES][512] __attribute__((aligned(4096)));
static u64 accepted[MAX_DATA_PAGES / 64];
static unsigned pool_used;
static u64 *pml4;
static int flavour;
static u64 private_bits; /* OR-ed into a private page's PTE (SNP: the C-bit) */
static u64 shared_bits;  /* OR-ed into a shared page's PTE (TDX: the shared bit) */
static u64 addr_mask;    /* the physical-address bits of a PTE */
static u32 checks;

void *memset(void *dst, int c, unsigned long n)
{
    void *d = dst;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
}

void *memcpy(void *dst, const void *src, unsigned long n)
{
    void *d = dst;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
    return dst;
}

static void puts_(const char *s)
{
    while (*s)
        outb(PORT_CONSOLE, (u8)*s++);
}

static void puthex(u64 v)
{
    char buf[19];
    int i = 18;
    buf[i] = 0;
    do {
        buf[--i] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v && i > 2);
    buf[--i] = 'x';
    buf[--i] = '0';
    puts_(buf + i);
}

static void sync(u64 phase)
{
    out_regs(PORT_SYNC, phase, 0, 0, 0, 0);
}

/* A failed check: tell the host (ExitGuestAssert) and stop for good. */
static __attribute__((noreturn)) void fail(u32 check, u64 gpa, u64 expected, u64 found)
{
    for (;;) {
        out_regs(PORT_ASSERT, gpa, expected, found, check, 0);
        hlt();
    }
}

static void expect(u32 check, u64 gpa, u64 expected, u64 found)
{
    if (expected != found)
        fail(check, gpa, expected, found);
    checks++;
}

/* --- flavour ------------------------------------------------------------------------------------ */

static void detect_flavour(void)
{
    u32 a, b, c, d;
    u64 phys_bits_mask = (1ull << 52) - 1;

    cpuid(0x80000000u, 0, &a, &b, &c, &d);
    if (a >= 0x8000001Fu) {
        cpuid(0x8000001Fu, 0, &a, &b, &c, &d);
        if ((a & (1u << 1)) && (a & (1u << 4))) {
            flavour = FLAVOUR_SNP;
            private_bits = 1ull << (b & 0x3f);
        }
    }
    if (flavour == FLAVOUR_PLAIN) {
        /* "IntelTDX    " in ebx, edx, ecx of leaf 0x21, read without checking the maximum leaf
         * (as Linux does): beyond it AMD answers zeros and Intel the highest leaf, neither of which
         * can carry the signature. */
        cpuid(0x21, 0, &a, &b, &c, &d);
        if (b == 0x65746e49u && d == 0x5844546cu && c == 0x20202020u) {
            u64 rcx = 0, status = tdcall(TDG_VP_INFO, 0, &rcx, 0);
            expect(CHECK_TDINFO, 0, 0, status);
            flavour = FLAVOUR_TDX;
            shared_bits = 1ull << ((rcx & 0x3f) - 1);
        }
    }
    addr_mask = phys_bits_mask & ~(PAGE - 1) & ~private_bits & ~shared_bits;
    puts_("c-guest: ");
    if (flavour == FLAVOUR_SNP) {
        puts_("snp, c-bit ");
        puthex(private_bits);
    } else if (flavour == FLAVOUR_TDX) {
        puts_("tdx, shared bit ");
        puthex(shared_bits);
    } else {
        puts_("plain");
    }
    puts_("\n");
}

/* --- page tables -------------------------------------------------------------------------------- */

static u64 *new_table(void)
{
    u64 *t;
    if (pool_used >= POOL_PAGES)
        fail(CHECK_PAGETABLES, 0, POOL_PAGES, pool_used + 1);
    t = pool[pool_used++];
    memset(t, 0, PAGE);
    return t;
}

/* The table an entry points to, creating it (or splitting a 2 MiB page into 4 KiB ones). */
static u64 *table_of(u64 *entry)
{
    u64 e = *entry, *t;
    if (!(e & PTE_P)) {
        t = new_table();
        *entry = (u64)t | shared_bits | PTE_P | PTE_W;
    } else if (e & PTE_PS) {
        u64 base = e & addr_mask & ~((2ull << 20) - 1), bits = e & ~addr_mask & ~PTE_PS & ~(PAGE - 1);
        t = new_table();
        for (int i = 0; i < 512; i++)
            t[i] = (base + i * PAGE) | bits | PTE_P | PTE_W;
        *entry = (u64)t | shared_bits | PTE_P | PTE_W;
    }
    return (u64 *)(*entry & addr_mask);
}

static u64 *pte_of(u64 va)
{
    u64 *pdpt = table_of(&pml4[(va >> 39) & 511]);
    u64 *pd = table_of(&pdpt[(va >> 30) & 511]);
    u64 *pt = table_of(&pd[(va >> 21) & 511]);
    return &pt[(va >> 12) & 511];
}

/* Map the identity page at va as private or shared; invlpg once paging is ours. */
static void map_page(u64 va, int private, int flush)
{
    *pte_of(va) = va | (private ? private_bits : shared_bits) | PTE_P | PTE_W;
    if (flush)
        invlpg(va);
}

static void build_page_tables(void)
{
    u64 *pdpt, *pd;
    u64 first = params.data_gpa, n = params.data_pages;

    pml4 = new_table();
    /* The loader window's 1 GiB (3-4 GiB): identity, 2 MiB pages, as the shared memory it is (an
     * ordinary memslot, no guest_memfd): SNP without the C-bit, TDX with the shared bit.  The
     * tables live there too, so the entries pointing at them and CR3 are shared the same way. */
    pdpt = table_of(&pml4[(LOADER_GPA >> 39) & 511]);
    pd = table_of(&pdpt[(LOADER_GPA >> 30) & 511]);
    for (u64 i = 0; i < 512; i++)
        pd[i] = ((LOADER_GPA & ~((1ull << 30) - 1)) + (i << 21)) | shared_bits | PTE_P | PTE_W | PTE_PS;
    for (u64 p = 0; p < n; p++)
        map_page(first + p * PAGE, 1, 0);
    map_page(params.bounce_gpa, 1, 0);
    write_cr3((u64)pml4 | shared_bits);
    puts_("paging: ");
    puthex(pool_used);
    puts_(" tables\n");
    sync(PHASE_PAGING);
}

/* --- acceptance and conversion ------------------------------------------------------------------ */

static void accept_page(u64 gpa)
{
    if (flavour == FLAVOUR_SNP) {
        int no_update;
        u32 ret = pvalidate(gpa, 0, 1, &no_update);
        expect(CHECK_PVALIDATE, gpa, 0, ret);
    } else if (flavour == FLAVOUR_TDX) {
        u64 ret = tdcall(TDG_MEM_PAGE_ACCEPT, gpa | 0, 0, 0);
        if (ret != TDX_ALREADY_ACCEPTED)
            expect(CHECK_ACCEPT, gpa, 0, ret);
    }
}

/* Accept a data page the first time it is used. */
static void use_data_page(u64 index)
{
    if (accepted[index / 64] & (1ull << (index % 64)))
        return;
    accept_page(params.data_gpa + index * PAGE);
    accepted[index / 64] |= 1ull << (index % 64);
}

static void snp_page_state(u64 gpa, u64 op)
{
    u64 resp;
    wrmsr(MSR_GHCB, GHCB_PSC_REQ | ((gpa >> 12) << 12) | (op << 52));
    vmgexit();
    resp = rdmsr(MSR_GHCB);
    expect(CHECK_PSC, gpa, GHCB_PSC_RESP, resp & 0xfff);
    expect(CHECK_PSC, gpa, 0, resp >> 32);
}

static void tdx_map_gpa(u64 gpa, int shared)
{
    u64 status, r10 = tdvmcall(TDVMCALL_MAP_GPA, gpa | (shared ? shared_bits : 0), PAGE, &status);
    expect(CHECK_MAPGPA, gpa, 0, status);
    expect(CHECK_MAPGPA, gpa, 0, r10);
}

static void share_page(u64 gpa)
{
    if (flavour == FLAVOUR_SNP) {
        int no_update;
        expect(CHECK_PVALIDATE, gpa, 0, pvalidate(gpa, 0, 0, &no_update));
        snp_page_state(gpa, 2);
        map_page(gpa, 0, 1);
    } else if (flavour == FLAVOUR_TDX) {
        tdx_map_gpa(gpa, 1);
        map_page(gpa, 0, 1);
    }
}

static void unshare_page(u64 gpa)
{
    if (flavour == FLAVOUR_SNP) {
        map_page(gpa, 1, 1);
        snp_page_state(gpa, 1);
        accept_page(gpa);
    } else if (flavour == FLAVOUR_TDX) {
        map_page(gpa, 1, 1);
        tdx_map_gpa(gpa, 0);
        accept_page(gpa);
    }
}

/* --- the work ----------------------------------------------------------------------------------- */

static u64 pattern(u64 page, u64 word)
{
    return (params.seed * 0x9E3779B97F4A7C15ull) ^ (page << 32) ^ (word * 0x100000001ull);
}

static void write_private_data(void)
{
    for (u64 p = 0; p < params.data_pages; p++) {
        volatile u64 *w = (volatile u64 *)(params.data_gpa + p * PAGE);
        use_data_page(p);
        for (u64 i = 0; i < PAGE / 8; i++)
            w[i] = pattern(p, i);
    }
    puts_("private data: ");
    puthex(params.data_pages);
    puts_(" pages\n");
    sync(PHASE_ACCEPTED);
}

static void verify_private_data(void)
{
    for (u64 p = 0; p < params.data_pages; p++) {
        volatile u64 *w = (volatile u64 *)(params.data_gpa + p * PAGE);
        for (u64 i = 0; i < PAGE / 8; i++)
            if (w[i] != pattern(p, i))
                fail(CHECK_DATA, params.data_gpa + p * PAGE + i * 8, pattern(p, i), w[i]);
        checks++;
    }
}

static void device_round(u64 round)
{
    volatile u8 *buf = (volatile u8 *)params.bounce_gpa;
    volatile u32 *hdr = (volatile u32 *)params.bounce_gpa;
    u32 len = (u32)params.payload, sum = 0;

    hdr[0] = REQ_MAGIC;
    hdr[1] = (u32)round;
    hdr[2] = len;
    hdr[3] = 0;
    for (u32 i = 0; i < len; i++) {
        u8 b = (u8)(params.seed + round * 7 + i);
        buf[REQ_HEADER + i] = b;
        sum += b;
    }
    outl(PORT_DEVICE, (u32)(params.bounce_gpa >> 12));
    /* The device answered in place: its magic, the round, the length, the sum of the request's
     * bytes, and the payload with every byte XOR 0x5A. */
    expect(CHECK_RESPONSE, params.bounce_gpa, RSP_MAGIC, hdr[0]);
    expect(CHECK_RESPONSE, params.bounce_gpa + 4, round, hdr[1]);
    expect(CHECK_RESPONSE, params.bounce_gpa + 8, len, hdr[2]);
    expect(CHECK_RESPONSE, params.bounce_gpa + 12, sum, hdr[3]);
    for (u32 i = 0; i < len; i++) {
        u8 want = (u8)(params.seed + round * 7 + i) ^ 0x5A;
        if (buf[REQ_HEADER + i] != want)
            fail(CHECK_RESPONSE, params.bounce_gpa + REQ_HEADER + i, want, buf[REQ_HEADER + i]);
    }
    checks++;
}

static void check_params(void)
{
    u64 data_end = params.data_gpa + params.data_pages * PAGE;
    expect(CHECK_PARAMS, 0, PARAMS_MAGIC, params.magic);
    if ((params.data_gpa | params.bounce_gpa) & (PAGE - 1))
        fail(CHECK_PARAMS, params.data_gpa, 0, params.bounce_gpa);
    if (params.data_pages > MAX_DATA_PAGES)
        fail(CHECK_PARAMS, params.data_gpa, MAX_DATA_PAGES, params.data_pages);
    if (params.payload > PAGE - REQ_HEADER)
        fail(CHECK_PARAMS, params.bounce_gpa, PAGE - REQ_HEADER, params.payload);
    if (params.bounce_gpa >= params.data_gpa && params.bounce_gpa < data_end)
        fail(CHECK_PARAMS, params.bounce_gpa, data_end, params.bounce_gpa);
}

void guest_main(void)
{
    check_params();
    detect_flavour();
    build_page_tables();
    write_private_data();

    /* The bounce page is ordinary private memory first (accepted and scrubbed), then shared. */
    accept_page(params.bounce_gpa);
    memset((void *)params.bounce_gpa, 0, PAGE);
    share_page(params.bounce_gpa);
    sync(PHASE_SHARED);
    for (u64 r = 0; r < params.rounds; r++)
        device_round(r);
    puts_("device: ");
    puthex(params.rounds);
    puts_(" round trips\n");
    sync(PHASE_DEVICE);

    unshare_page(params.bounce_gpa);
    memset((void *)params.bounce_gpa, 0, PAGE);
    verify_private_data();
    sync(PHASE_PRIVATE);
    puts_("pass: ");
    puthex(checks);
    puts_(" checks\n");
    outl(PORT_RESULT, (u32)flavour | (checks << 8));
}

__asm__(".section .text.entry, \"ax\"\n"
        ".global _start\n"
        "_start:\n"
        "    cld\n"
        "    movabs $guest_main, %rax\n"
        "    call *%rax\n"
        "1:  hlt\n"
        "    jmp 1b\n"
        ".previous\n");
