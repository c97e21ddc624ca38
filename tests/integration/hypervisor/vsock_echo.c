/* Guest-side test helper: accept AF_VSOCK connections on a port and echo "echo:" + data. */
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    struct sockaddr_vm addr;
    int port = argc > 1 ? atoi(argv[1]) : 1024;
    int srv = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (srv < 0) { perror("socket"); return 1; }
    memset(&addr, 0, sizeof addr);
    addr.svm_family = AF_VSOCK;
    addr.svm_port = port;
    addr.svm_cid = VMADDR_CID_ANY;
    if (bind(srv, (struct sockaddr *)&addr, sizeof addr) < 0) { perror("bind"); return 1; }
    if (listen(srv, 4) < 0) { perror("listen"); return 1; }
    printf("VSOCK-LISTENING %d\n", port);
    fflush(stdout);
    for (;;) {
        char buf[4096];
        ssize_t n;
        int c = accept(srv, NULL, NULL);
        if (c < 0) { perror("accept"); continue; }
        while ((n = read(c, buf, sizeof buf)) > 0) {
            if (write(c, "echo:", 5) != 5 || write(c, buf, n) != n) break;
        }
        close(c);
    }
}
