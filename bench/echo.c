/* The floor: a line echo in C. Every complete line read from stdin is written back to stdout at
 * once (all complete lines of one read() in one write()), so a round trip through it costs two
 * pipe hops and nothing else. Lines may be of any length. Used by bench/run only. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int write_all(const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(1, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

int main(void) {
    size_t cap = 1 << 20, len = 0;
    char *buf = malloc(cap);
    if (!buf) return 1;
    for (;;) {
        if (len == cap) {
            cap *= 2;
            char *grown = realloc(buf, cap);
            if (!grown) return 1;
            buf = grown;
        }
        ssize_t r = read(0, buf + len, cap - len);
        if (r < 0) {
            if (errno == EINTR) continue;
            return 1;
        }
        if (r == 0) break;
        size_t scanned = len;
        len += (size_t)r;
        char *last = NULL;
        for (char *p = buf + len; p > buf + scanned;) {
            if (*--p == '\n') {
                last = p;
                break;
            }
        }
        if (!last) continue;
        size_t upto = (size_t)(last - buf) + 1;
        if (write_all(buf, upto) < 0) return 1;
        memmove(buf, buf + upto, len - upto);
        len -= upto;
    }
    if (len > 0 && write_all(buf, len) < 0) return 1;
    return 0;
}
