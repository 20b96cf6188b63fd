"""
The cluster: which of several running instances owns each site.

Owns the assignment of sites to live instances (rendezvous hashing with
quotas, L{mqttsvc.cluster.assignment}) and the lease keeper
(L{mqttsvc.cluster.keeper.LeaseKeeper}), the service that renews this
instance's leases, acquires the sites the assignment gives it, hands the
others over cleanly, fences itself when it cannot renew, and gives the
writer the epochs every batch is fenced with.  It reaches the database only
through the L{mqttsvc.cluster.keeper.LeaseStore} Protocol it declares
(implemented by L{mqttsvc.db.leases}), so it imports nothing of the
database room.  So that any replica answers for any site, the live-status
publisher (L{mqttsvc.cluster.publisher}) writes the status of the sites
this instance owns at least once a second (through the C{LiveStore}
Protocol), and L{mqttsvc.cluster.commands} is how another replica asks
the owner to restart a site.  The protocol and its failure cases:
docs/cluster.md.

May import: config, records, runtime.
"""
