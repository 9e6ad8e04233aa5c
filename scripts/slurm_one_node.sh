#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, from Debian's slurm-wlm and munge (as root), for testing grid.py
# against a real slurmctld / slurmd:
#
#   scripts/slurm_one_node.sh start DIR     # config, state and logs in DIR; prints `export SLURM_CONF=DIR/slurm.conf`
#   scripts/slurm_one_node.sh stop  DIR     # stops the daemons started from DIR (munged is left running)
#
# Needs: apt-get install slurm-wlm munge. Every client command (sbatch, squeue, scontrol, ...) finds the cluster
# through SLURM_CONF. Time limits are checked by slurmctld every 30 s, so a job's --signal=SIG@N warning
# comes N to N+30 s before its limit. Nothing in /etc/slurm is changed.
set -euo pipefail
cmd=${1:?start|stop}; dir=$(realpath -m "${2:?a folder for the config, state and logs}")
conf=$dir/slurm.conf

stop() {
    for d in slurmd slurmctld; do
        pid=$(cat "$dir/$d.pid" 2>/dev/null || true)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid"; for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$dir/$d.pid"
    done
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
for tool in slurmctld slurmd munged sbatch; do
    command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install slurm-wlm munge" >&2; exit 3; }
done
[ "$(id -u)" = 0 ] || { echo "run as root (slurmd and munged need it here)" >&2; exit 3; }

# munge: one daemon for the machine, on its default socket (the one SLURM's auth/munge asks)
if ! munge -n >/dev/null 2>&1; then
    [ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key -f; }
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge; chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- munged
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || { echo "munged did not start" >&2; exit 1; }
fi

stop
mkdir -p "$dir/state" "$dir/spool"
node=$(hostname -s)
hw=$(slurmd -C | head -1 | sed "s/^NodeName=[^ ]*//")
port=${SLURM_TEST_PORT:-6817}
cat > "$conf" <<CONF
ClusterName=iactest
SlurmctldHost=$node
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=30
InactiveLimit=0
MpiDefault=none
NodeName=$node $hw State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
slurmctld -f "$conf" -i
slurmd -f "$conf"
export SLURM_CONF=$conf
for _ in $(seq 100); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        echo "export SLURM_CONF=$conf"; exit 0
    fi
    sleep 0.2
done
echo "the cluster did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
sinfo >&2 || true
exit 1
