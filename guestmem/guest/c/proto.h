/* The C guest's host protocol and launch parameters (mirrored in guestmem/guest/cbuild.py; a test
 * checks the two agree).
 *
 * Port I/O, all `out`, so no host ever has to complete an input:
 *   PORT_CONSOLE (0xE9, 1 byte)   one console character (the Bochs/QEMU debug-console port)
 *   PORT_SYNC   (0x5EC0, r8)      a phase the guest reached (PHASE_*): ExitSync(value=r8)
 *   PORT_ASSERT (0x5EC1, r8-r12)  a failed check: r8 = gpa, r9 = expected, r10 = found,
 *                                 r11 = check number (CHECK_*), r12 = 0: ExitGuestAssert
 *   PORT_DEVICE (0x5EC2, 4 bytes) device doorbell: the value is the bounce buffer's gfn; the
 *                                 host reads the request there and writes its response back
 *   PORT_RESULT (0x5EC3, 4 bytes) the final result: flavour | checks passed << 8; then hlt
 */
#ifndef GUESTMEM_CGUEST_PROTO_H
#define GUESTMEM_CGUEST_PROTO_H

#define PORT_CONSOLE 0xE9
#define PORT_SYNC    0x5EC0
#define PORT_ASSERT  0x5EC1
#define PORT_DEVICE  0x5EC2
#define PORT_RESULT  0x5EC3

#define FLAVOUR_PLAIN 0 /* no private memory: DEFAULT or SW_PROTECTED-like without C-bit/shared bit */
#define FLAVOUR_SNP   1
#define FLAVOUR_TDX   2

#define PHASE_PAGING   1 /* own page tables loaded */
#define PHASE_ACCEPTED 2 /* private data written, each page accepted on first use */
#define PHASE_SHARED   3 /* bounce buffer converted to shared (before the first device request) */
#define PHASE_DEVICE   4 /* every device round trip done */
#define PHASE_PRIVATE  5 /* bounce buffer back to private, private data verified */

#define CHECK_PVALIDATE    1
#define CHECK_ACCEPT       2
#define CHECK_PSC          3
#define CHECK_MAPGPA       4
#define CHECK_RESPONSE     5
#define CHECK_DATA         6
#define CHECK_TDINFO       7
#define CHECK_PARAMS       8
#define CHECK_PAGETABLES   9

#define REQ_MAGIC  0x51455247u /* "GREQ" */
#define RSP_MAGIC  0x50535247u /* "GRSP" */
#define REQ_HEADER 16          /* magic, round, length, reserved (u32 each), then the payload */

#define PARAMS_MAGIC 0x3152415047434d47ull /* "GMCGPAR1" */

/* Patched into the image by the host before loading (found by its magic). */
struct guest_params {
    unsigned long long magic;
    unsigned long long data_gpa;    /* private data area, page-aligned */
    unsigned long long data_pages;  /* pages of it the guest writes (each accepted on first use) */
    unsigned long long bounce_gpa;  /* one page shared with the device */
    unsigned long long rounds;      /* device round trips */
    unsigned long long payload;     /* request payload bytes, <= 4096 - REQ_HEADER */
    unsigned long long seed;        /* varies the data pattern */
};

#endif
