"""
The process: what every room shares about running as one long-lived
Twisted process, and nothing about MQTT, sites or the database.

  - L{root <mqttsvc.runtime.root>}: the root service, whose stop has a
    deadline (the process exits by then, finished or not);
  - L{logs <mqttsvc.runtime.logs>}: where and how the process logs (text or
    JSON lines, rotated by size);
  - L{summary <mqttsvc.runtime.summary>}: log lines a stranger can make us
    write many times a second, summarized;
  - L{descriptors <mqttsvc.runtime.descriptors>}: the file descriptor
    budget that the sites and HTTP connections draw on;
  - L{heap <mqttsvc.runtime.heap>}: freezing the start-up heap out of the
    garbage collector's full collections.

May import: nothing of mqttsvc.
"""
