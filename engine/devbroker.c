/* SPDX-License-Identifier: MIT */
/*
 * fanout-devbroker: the development Kafka broker in a process of its own,
 * for what must outlive one fanoutd (crash tests, several fanoutd nodes on
 * one cluster). It keeps everything in memory; it is for development and
 * tests only.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fanout/common.h"
#include "kafka_mock.h"
#include "log.h"
#include "version.h"

#define MAX_TOPICS 16

static void usage(FILE *to) {
  fprintf(to,
          "usage: fanout-devbroker [-p PARTITIONS] [-f FILE] [-t TOPIC]...\n"
          "\n"
          "Runs an in-memory Kafka broker (librdkafka's mock cluster) on\n"
          "127.0.0.1 until SIGTERM or SIGINT, and writes its bootstrap\n"
          "address to FILE. For development and tests only.\n"
          "\n"
          "  -p PARTITIONS  partitions per topic (default 4)\n"
          "  -f FILE        bootstrap file (default var/kafka.bootstrap)\n"
          "  -t TOPIC       topic to create; repeatable (default:\n"
          "                 notifications, notifications.dlq, chat)\n");
}

int main(int argc, char **argv) {
  const char *topics[MAX_TOPICS + 1] = {0};
  const char *file = "var/kafka.bootstrap";
  int ntopics = 0, partitions = 4, sig;
  fo_kmock *m = NULL;
  sigset_t set;
  char err[512];

  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
      usage(stdout);
      return 0;
    } else if (strcmp(argv[i], "--version") == 0) {
      printf("fanout-devbroker %s\n", FO_VERSION);
      return 0;
    } else if (strcmp(argv[i], "-p") == 0 && i + 1 < argc) {
      partitions = atoi(argv[++i]);
    } else if (strcmp(argv[i], "-f") == 0 && i + 1 < argc) {
      file = argv[++i];
    } else if (strcmp(argv[i], "-t") == 0 && i + 1 < argc &&
               ntopics < MAX_TOPICS) {
      topics[ntopics++] = argv[++i];
    } else {
      usage(stderr);
      return 2;
    }
  }
  if (partitions < 1 || partitions > 64) {
    fprintf(stderr, "fanout-devbroker: -p: expected 1-64\n");
    return 2;
  }
  if (ntopics == 0) {
    topics[0] = "notifications";
    topics[1] = "notifications.dlq";
    topics[2] = "chat";
  }

  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, NULL);

  if (fo_kmock_start(topics, partitions, &m, err, sizeof(err)) != FO_OK) {
    fprintf(stderr, "fanout-devbroker: %s\n", err);
    return 1;
  }
  if (fo_kmock_write_bootstrap(m, file) != FO_OK) {
    fprintf(stderr, "fanout-devbroker: cannot write %s\n", file);
    fo_kmock_stop(m);
    return 1;
  }
  fo_log_info("devbroker", "running (development only)",
              "bootstrap=%s file=\"%s\" partitions=%d",
              fo_kmock_bootstraps(m), file, partitions);

  sigwait(&set, &sig);
  fo_log_info("devbroker", "stopping", "signal=%d", sig);
  fo_kmock_stop(m);
  return 0;
}
