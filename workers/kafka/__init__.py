"""Kafka I/O: clients, records, the source, codecs, decode-ahead, dead letters, group commits,
topics, producing, the embedded broker."""
