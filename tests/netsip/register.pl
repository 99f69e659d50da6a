#!/usr/bin/perl
# Drives Net::SIP (libnet-sip-perl) as a phone for tests/test_interop_netsip.py.
#
#   register.pl HOST PORT udp|tcp USER [PASSWORD]
#
# Writes the registrar's host:port into From/To (sip:USER@HOST:PORT), as a phone
# configured with that server does, and lets Net::SIP pick its own Contact (its
# leg's address: it binds 5060, else the next free port).  Then reads commands, one a line, from standard input:
#   register EXPIRES   one REGISTER (Net::SIP answers a 401 itself when a
#                      password was given; like Net::SIP::Simple always does,
#                      each REGISTER has a new Call-ID and CSeq 1), then prints
#                      "done CODE EXPIRES-FROM-THE-200 CONTACT" (or "fail CODE ...")
# and stops at end of input.  Every step is bounded (Net::SIP's own timeouts
# plus an alarm).
use strict;
use warnings;
use Net::SIP;

my ($host, $port, $proto, $user, $password) = @ARGV;
die "usage: $0 HOST PORT udp|tcp USER [PASSWORD]\n" unless $user;
$| = 1;
alarm 60;    # the whole run

my $registrar = "sip:$host:$port" . ($proto eq 'tcp' ? ';transport=tcp' : '');
my $ua = Net::SIP::Simple->new(
    registrar => $registrar,
    from      => "sip:$user\@$host:$port",
    ($password ? (auth => [ $user, $password ]) : ()),
);

while (my $line = <STDIN>) {
    chomp $line;
    my ($cmd, $expires) = split ' ', $line;
    next unless $cmd;
    die "unknown command $cmd\n" unless $cmd eq 'register';
    my ($status, %info);
    $ua->register(
        expires  => $expires,
        cb_final => sub { ($status, %info) = @_ },
    );
    $ua->loop(20, \$status);
    my $packet = $info{packet};
    my $code = $packet ? $packet->code : ($info{errno} // 'timeout');
    my @contacts = $packet ? $packet->get_header('contact') : ();
    my $got = defined $info{expires} ? $info{expires} : '-';
    printf "%s %s %s %s\n", ($status // '') eq 'OK' ? 'done' : 'fail', $code, $got,
        join(',', map { s/\s+//gr } @contacts) || '-';
}
