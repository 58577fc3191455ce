module crm-events/bench/loadgen

go 1.22
